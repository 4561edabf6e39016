"""Training chat templates: the model's own template with `{% generation %}` markers around what the
assistant writes, so TRL's `assistant_only_loss` can put labels on the assistant turn and nowhere else.

Order of preference:
1. the template already has the markers: used as is;
2. TRL ships a training variant of it (`trl.chat_template_utils.get_training_chat_template`: Llama 3,
   Qwen, Gemma, Phi, ...);
3. a ChatML template (`<|im_start|>role\\n...<|im_end|>\\n`, e.g. SmolLM2's, which TRL does not know):
   rebuilt here with markers around the assistant content and its `<|im_end|>`, keeping the default system
   prompt the original injects. It is used only if it renders exactly what the original renders on probe
   conversations (markers aside); otherwise
4. an error naming the setting to change (`hyperparameters.chat_template`: a template by name, see
   grape.chat_templates), never a silent run with labels on the prompt.
"""

from __future__ import annotations

from typing import Any

from grape.chat_templates import CHATML_TRAINING

PROBE = "\x00probe\x00"


class TemplateError(ValueError):
    """No training-compatible chat template could be made for this tokenizer."""


def has_generation_markers(template: str) -> bool:
    from trl.chat_template_utils import has_generation_markers as trl_has

    return trl_has(template)


def _probes() -> list[list[dict[str, str]]]:
    u = {"role": "user", "content": "What is 2 + 2?"}
    a = {"role": "assistant", "content": "2 + 2 = 4."}
    s = {"role": "system", "content": "You are terse."}
    return [
        [u],
        [u, a],
        [s, u, a],
        [u, a, {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6."}],
    ]


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


def _default_system(tokenizer: Any, template: str) -> str:
    """The system prompt the template adds when the conversation has none ('' when it adds none)."""
    text = _render(tokenizer, template, [{"role": "user", "content": PROBE}], False)
    head = text.split("<|im_start|>user\n", 1)[0]
    start, end = "<|im_start|>system\n", "<|im_end|>\n"
    if head.startswith(start) and head.endswith(end):
        return head[len(start) : -len(end)]
    return ""


def chatml_training_template(tokenizer: Any, original: str) -> str | None:
    """The ChatML training template for `original`, or None when it does not render like the original."""
    if "<|im_start|>" not in original or "<|im_end|>" not in original:
        return None
    try:
        system = _default_system(tokenizer, original)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe is not ChatML for us
        return None
    candidate = "{%- set default_system = " + repr(system) + " %}" + CHATML_TRAINING
    for messages in _probes():
        for gen in (False, True):
            if messages[-1]["role"] == "assistant" and gen:
                continue
            try:
                if _render(tokenizer, candidate, messages, gen) != _render(tokenizer, original, messages, gen):
                    return None
            except Exception:  # noqa: BLE001
                return None
    return candidate


def training_chat_template(tokenizer: Any) -> str:
    """A template with `{% generation %}` markers that renders like the tokenizer's own; see the module doc."""
    original = tokenizer.chat_template
    if isinstance(original, dict):
        original = original.get("default")
    if not original:
        raise TemplateError(
            "the base model's tokenizer has no chat template: train on the plain template (dataset template "
            "'plain'), or name a training template in hyperparameters.chat_template"
        )
    if has_generation_markers(original):
        return original
    from trl.chat_template_utils import get_training_chat_template

    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        patched = None
    if patched:
        return patched
    chatml = chatml_training_template(tokenizer, original)
    if chatml is not None:
        return chatml
    raise TemplateError(
        "the base model's chat template has no {% generation %} markers, and neither TRL nor grape knows a "
        "training variant of it: name one in hyperparameters.chat_template (a template with the markers around "
        "the assistant content; the operator adds their own as GRAPE_CHAT_TEMPLATE_DIR/NAME.jinja), or set "
        "hyperparameters.assistant_only_loss to false to train on every token"
    )
