"""Records that cross process boundaries: items as uploaded and stored, scores as written by workers."""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator


class Template(StrEnum):
    """How a pair is turned into tokens."""

    auto = "auto"  # the tokenizer's chat template when it has one, else `plain`
    chat = "chat"  # the tokenizer's chat template with the generation prompt; an error if it has none
    plain = "plain"  # the GRAPE paper's `Question: {instruction}\nAnswer: {response}`


class DatasetState(StrEnum):
    empty = "empty"  # created, nothing uploaded yet
    scoring = "scoring"  # some accepted items are neither scored nor failed
    done = "done"  # every accepted item is scored or failed


class Turn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class Candidate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source: StrictStr | None = Field(None, description="Who wrote the response (e.g. the model name).")
    response: StrictStr = Field(min_length=1, description="The candidate response text (not empty).")


class ItemIn(BaseModel):
    """One instruction with its candidate responses, as a client uploads it."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr | None = Field(
        None, min_length=1, max_length=256, description="Stable id; default: a hash of the content."
    )
    instruction: StrictStr | None = Field(None, description="A single-turn instruction.")
    messages: list[Turn] | None = Field(None, description="A chat history ending with a user turn.")
    candidates: list[Candidate] = Field(min_length=1, description="Candidate final assistant turns.")

    @model_validator(mode="after")
    def _one_prompt(self) -> ItemIn:
        if (self.instruction is None) == (self.messages is None):
            raise ValueError("give exactly one of 'instruction' or 'messages'")
        if self.instruction is not None and not self.instruction.strip():
            raise ValueError("'instruction' is empty")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("'messages' is empty")
            if self.messages[-1].role != "user":
                raise ValueError("'messages' must end with a user turn (the candidates are the reply)")
        return self

    def stored(self) -> dict[str, Any]:
        """The compact form kept in Redis and read by workers, with its id filled in."""
        body: dict[str, Any] = {}
        if self.instruction is not None:
            body["instruction"] = self.instruction
        else:
            body["messages"] = [t.model_dump() for t in self.messages or []]
        body["candidates"] = [
            {"source": c.source if c.source is not None else f"c{i}", "response": c.response}
            for i, c in enumerate(self.candidates)
        ]
        body["id"] = self.id if self.id is not None else content_id(body)
        return body


_ROLES = frozenset(("system", "user", "assistant"))


def stored_if_plain(obj: dict[str, Any]) -> dict[str, Any] | None:
    """`ItemIn.model_validate(obj).stored()` for an item that is plainly valid, without building models (an upload
    of thousands of items spent most of its validation there); None for anything else, which `ItemIn` then
    validates and names the fault of. Accepts only what ItemIn accepts, and gives the same stored form:
    tests/test_ingest_fast_path.py compares the two on generated items."""
    ident = obj.get("id")
    if ident is not None and (type(ident) is not str or not 1 <= len(ident) <= 256):
        return None
    instruction, messages, candidates = obj.get("instruction"), obj.get("messages"), obj.get("candidates")
    if type(candidates) is not list or not candidates:
        return None
    body: dict[str, Any] = {}
    if instruction is not None:
        if messages is not None or type(instruction) is not str or not instruction.strip():
            return None
        body["instruction"] = instruction
    else:
        if type(messages) is not list or not messages:
            return None
        turns = []
        for t in messages:
            if type(t) is not dict:
                return None
            role, content = t.get("role"), t.get("content")
            if type(role) is not str or role not in _ROLES or type(content) is not str:
                return None
            turns.append({"role": role, "content": content})
        if turns[-1]["role"] != "user":
            return None
        body["messages"] = turns
    cands = []
    for i, c in enumerate(candidates):
        if type(c) is not dict:
            return None
        source, response = c.get("source"), c.get("response")
        if type(response) is not str or not response:
            return None
        if source is None:
            source = f"c{i}"
        elif type(source) is not str:
            return None
        cands.append({"source": source, "response": response})
    body["candidates"] = cands
    body["id"] = ident if ident is not None else content_id(body)
    return body


def content_id(body: dict[str, Any]) -> str:
    """A deterministic id from the content, so an id-less item uploaded twice is still a duplicate."""
    digest = hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=12).hexdigest()
    return f"h-{digest}"


def prompt_messages(item: dict[str, Any]) -> list[dict[str, str]]:
    """The chat turns before the candidate reply, for a stored item."""
    if "messages" in item:
        return list(item["messages"])
    return [{"role": "user", "content": item["instruction"]}]


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def loads(raw: bytes | str) -> Any:
    return orjson.loads(raw)
