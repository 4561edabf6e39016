"""The response-token boundary is exact: prompt ids + response ids, with the response scored alone."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from grape.formatting import FormatError, plain_prompt, prompt_ids, resolve_template, response_ids
from grape.records import Template


@pytest.fixture(scope="module")
def tok(model_path: str):
    return AutoTokenizer.from_pretrained(model_path)


def test_auto_uses_the_chat_template_when_the_tokenizer_has_one(tok) -> None:
    assert resolve_template(tok, "auto") is Template.chat


def test_chat_prompt_ends_with_the_assistant_header_and_response_follows(tok) -> None:
    item = {"instruction": "What is the capital of France?", "candidates": []}
    p = prompt_ids(tok, item, Template.chat)
    r = response_ids(tok, "The capital of France is Paris.", Template.chat)
    assert tok.decode(p).endswith("<|im_start|>assistant\n")
    assert tok.decode(p).count("<|im_start|>") == 3  # default system turn, user, assistant header
    assert tok.decode(r) == "The capital of France is Paris."
    full = tok.apply_chat_template(
        [{"role": "user", "content": item["instruction"]}], add_generation_prompt=True, tokenize=False
    )
    assert tok.decode(p) == full


def test_plain_template_is_the_grape_paper_template(tok) -> None:
    item = {"instruction": "Name a colour.", "candidates": []}
    p = prompt_ids(tok, item, Template.plain)
    r = response_ids(tok, "Blue.", Template.plain)
    assert tok.decode(p + r) == "Question: Name a colour.\nAnswer: Blue."


def test_multi_turn_history_is_the_prompt(tok) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ]
    text = tok.decode(prompt_ids(tok, {"messages": messages}, Template.chat))
    assert text.index("Hi") < text.index("Hello!") < text.index("Name a colour.")
    assert text.endswith("<|im_start|>assistant\n")
    assert plain_prompt(messages) == "Question: Hi\nAnswer: Hello!\n\nQuestion: Name a colour.\nAnswer:"


def test_chat_template_asked_without_one_is_an_error(tok) -> None:
    class NoChat:
        chat_template = None

    with pytest.raises(FormatError, match="no chat template"):
        resolve_template(NoChat(), "chat")
    assert resolve_template(NoChat(), "auto") is Template.plain
