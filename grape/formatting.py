"""Turning an (instruction, candidate) pair into token ids with an exact response boundary.

ids = tokens(prompt rendering) + tokens(response text). The prompt rendering is the chat template with
the generation prompt, or the GRAPE paper's plain template `Question: {instruction}\\nAnswer: {response}`.
Tokenizing the two parts separately is what makes the boundary exact: every id after the prompt is a
response token, and only those are scored.
"""

from __future__ import annotations

from typing import Any, Protocol

from grape.records import Template, prompt_messages


class Tokenizer(Protocol):
    chat_template: Any
    bos_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class FormatError(ValueError):
    """The pair cannot be rendered as asked (e.g. `chat` with a tokenizer that has no chat template)."""


def resolve_template(tokenizer: Tokenizer, template: Template | str) -> Template:
    template = Template(template)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template is Template.auto:
        return Template.chat if has_chat else Template.plain
    if template is Template.chat and not has_chat:
        raise FormatError("template 'chat' asked, but the tokenizer has no chat template; use 'plain' or 'auto'")
    return template


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """GRAPE's plain template; a multi-turn history becomes alternating Question/Answer blocks."""
    parts: list[str] = []
    system = [m["content"] for m in messages if m["role"] == "system"]
    if system:
        parts.append("\n".join(system) + "\n\n")
    for m in messages:
        if m["role"] == "user":
            parts.append(f"Question: {m['content']}\n")
        elif m["role"] == "assistant":
            parts.append(f"Answer: {m['content']}\n\n")
    parts.append("Answer:")
    return "".join(parts)


def _ids(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return [int(i) for i in ids]


def prompt_ids(tokenizer: Tokenizer, item: dict[str, Any], template: Template) -> list[int]:
    """Token ids of everything before the response: BOS/system/history and the assistant header."""
    messages = prompt_messages(item)
    if template is Template.chat:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # the template already holds its special tokens; adding BOS again would double it
        return _ids(tokenizer(text, add_special_tokens=False))
    return _ids(tokenizer(plain_prompt(messages), add_special_tokens=True))


def response_ids(tokenizer: Tokenizer, response: str, template: Template) -> list[int]:
    """Token ids of the response alone. In the plain template the space after 'Answer:' belongs
    to the response, as a BPE tokenizer attaches a leading space to the following word."""
    text = response if template is Template.chat else " " + response
    return _ids(tokenizer(text, add_special_tokens=False))


def response_ids_batch(tokenizer: Tokenizer, responses: list[str], template: Template) -> list[list[int]]:
    """`response_ids` of many responses in one tokenizer call (a fast tokenizer encodes a batch on every
    core); the same ids as one call each."""
    if not responses:
        return []
    texts = responses if template is Template.chat else [" " + r for r in responses]
    return [_ids(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def unconditioned_prompt_ids(tokenizer: Tokenizer) -> list[int]:
    """The context for log p(y) without the instruction (IFD's second pass): BOS alone, when it exists."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
