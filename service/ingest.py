"""Parsing and validating an upload: JSON `{"items": [...]}` or NDJSON, item by item.

A bad item is rejected with its position and the field at fault; the good ones go on.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

from grape.records import ItemIn
from grape.settings import Settings
from service.errors import BadRequest, TooLarge, Unprocessable
from service.schemas import Rejected

NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/json-lines")


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "item"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def check_item(obj: Any, settings: Settings) -> dict[str, Any]:
    """The stored form of one valid item; raises ValueError naming the field otherwise."""
    if not isinstance(obj, dict):
        raise ValueError(f"item: expected a JSON object, got {type(obj).__name__}")
    try:
        item = ItemIn.model_validate(obj)
    except ValidationError as exc:
        raise ValueError(_describe(exc)) from None
    if len(item.candidates) > settings.max_candidates_per_item:
        raise ValueError(
            f"candidates: {len(item.candidates)} candidates, more than the limit "
            f"{settings.max_candidates_per_item} (GRAPE_MAX_CANDIDATES_PER_ITEM)"
        )
    limit = settings.max_response_chars
    for i, c in enumerate(item.candidates):
        if len(c.response) > limit:
            raise ValueError(f"candidates.{i}.response: {len(c.response)} characters, limit {limit}")
    texts = [item.instruction or ""] + [t.content for t in item.messages or []]
    if any(len(t) > limit for t in texts):
        raise ValueError(f"instruction/messages: a turn is longer than {limit} characters")
    return item.stored()


def parse_upload(body: bytes, content_type: str, settings: Settings) -> tuple[list[dict[str, Any]], list[Rejected]]:
    if len(body) > settings.max_body_bytes:
        raise TooLarge(f"body is {len(body)} bytes, limit {settings.max_body_bytes} (GRAPE_MAX_BODY_BYTES)")
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in NDJSON_TYPES:
        raw_items: list[tuple[int, Any]] = []
        rejected: list[Rejected] = []
        for n, line in enumerate(body.split(b"\n")):
            if not line.strip():
                continue
            try:
                raw_items.append((n, orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                rejected.append(Rejected(index=n, error=f"line {n + 1}: not valid JSON ({exc})"))
    else:
        if not body.strip():
            raise BadRequest('empty body: send {"items": [...]} as JSON, or NDJSON lines')
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
            raise Unprocessable('body: expected {"items": [...]} (or send Content-Type: application/x-ndjson)')
        raw_items = list(enumerate(doc["items"]))
        rejected = []
    if len(raw_items) > settings.max_items_per_request:
        raise TooLarge(
            f"items: {len(raw_items)} in one request, limit {settings.max_items_per_request} "
            "(GRAPE_MAX_ITEMS_PER_REQUEST); split the upload"
        )
    good: list[dict[str, Any]] = []
    for index, obj in raw_items:
        try:
            good.append(check_item(obj, settings))
        except ValueError as exc:
            ident = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
            rejected.append(Rejected(index=index, id=ident, error=str(exc)))
    rejected.sort(key=lambda r: r.index)
    return good, rejected
