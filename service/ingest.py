"""Parsing and validating an upload: JSON `{"items": [...]}` or NDJSON, item by item.

A bad item is rejected with its position and the field at fault; the good ones go on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from pydantic import ValidationError

from grape.records import ItemIn, stored_if_plain
from grape.settings import Settings
from service.errors import BadRequest, TooLarge, Unprocessable, UnsupportedType
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
    item = stored_if_plain(obj)
    if item is None:  # not plainly valid: pydantic finds the fault and words it (or accepts what it coerces)
        try:
            item = ItemIn.model_validate(obj).stored()
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None
    candidates = item["candidates"]
    if len(candidates) > settings.max_candidates_per_item:
        raise ValueError(
            f"candidates: {len(candidates)} candidates, more than the limit "
            f"{settings.max_candidates_per_item} (GRAPE_MAX_CANDIDATES_PER_ITEM)"
        )
    limit = settings.max_response_chars
    for i, c in enumerate(candidates):
        if len(c["response"]) > limit:
            raise ValueError(f"candidates.{i}.response: {len(c['response'])} characters, limit {limit}")
    if len(item.get("instruction") or "") > limit or any(len(t["content"]) > limit for t in item.get("messages", ())):
        raise ValueError(f"instruction/messages: a turn is longer than {limit} characters")
    return item


UPLOAD_TYPES = ("application/json", *NDJSON_TYPES)


def upload_type(content_type: str) -> str:
    """The media type of an upload; 415 unless it is JSON or NDJSON (a browser form or a `text/plain`
    request from another site's page can then never upload)."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype not in UPLOAD_TYPES:
        raise UnsupportedType(
            f"Content-Type {ctype[:64] or '(none)'!r} is not accepted for uploads: send application/json "
            f'({{"items": [...]}}) or application/x-ndjson (one item per line)'
        )
    return ctype


class _Rejections:
    """The first `limit` rejections, and how many there were in all (an answer stays small)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.listed: list[Rejected] = []
        self.total = 0

    def full(self) -> bool:
        return len(self.listed) >= self.limit

    def add(self, index: int, error: str, ident: str | None = None) -> None:
        self.total += 1
        if not self.full():
            self.listed.append(Rejected(index=index, id=ident[:256] if ident else None, error=error))


def _lines(body: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of an NDJSON body, one at a time (no list of millions of lines)."""
    n, start = 0, 0
    while start < len(body):
        end = body.find(b"\n", start)
        end = len(body) if end < 0 else end
        yield n, body[start:end]
        n, start = n + 1, end + 1


def parse_upload(
    body: bytes, content_type: str, settings: Settings
) -> tuple[list[dict[str, Any]], list[Rejected], int, list[int]]:
    """The valid items (stored form), the first GRAPE_MAX_REJECTIONS rejections, the rejection count, and each
    valid item's position in the upload (a later refusal, by a quota, names it)."""
    if len(body) > settings.max_body_bytes:
        raise TooLarge(f"body is {len(body)} bytes, limit {settings.max_body_bytes} (GRAPE_MAX_BODY_BYTES)")
    ctype = upload_type(content_type)
    rejected = _Rejections(settings.max_rejections)
    raw_items: Iterable[tuple[int, Any]]
    if ctype in NDJSON_TYPES:
        raw_items = _ndjson_items(body, rejected, give_up=settings.max_items_per_request)
    else:
        if not body.strip():
            raise BadRequest('empty body: send {"items": [...]} as JSON, or NDJSON lines')
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
            raise Unprocessable('body: expected {"items": [...]} (or send Content-Type: application/x-ndjson)')
        if len(doc["items"]) > settings.max_items_per_request:
            raise _too_many(settings, len(doc["items"]))
        raw_items = enumerate(doc["items"])
    good: list[dict[str, Any]] = []
    positions: list[int] = []
    for parsed, (index, obj) in enumerate(raw_items, start=1):
        if parsed > settings.max_items_per_request:
            raise _too_many(settings)
        try:
            good.append(check_item(obj, settings))
            positions.append(index)
        except ValueError as exc:
            ident = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
            rejected.add(index, str(exc), ident)
    rejected.listed.sort(key=lambda r: r.index)
    return good, rejected.listed, rejected.total, positions


def _ndjson_items(body: bytes, rejected: _Rejections, give_up: int) -> Iterator[tuple[int, Any]]:
    for n, line in _lines(body):
        if not line.strip():
            continue
        if rejected.total > give_up:  # the rest is not worth reading (and each bad line costs a parse)
            raise Unprocessable(
                f"no item accepted: more than {give_up} lines rejected (GRAPE_MAX_ITEMS_PER_REQUEST), the rest of "
                f"the upload was not read; the first {len(rejected.listed)} are listed",
                rejected=[r.model_dump() for r in rejected.listed],
                rejected_total=rejected.total,
            )
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if rejected.full():  # counted only: formatting a message nobody will see is most of the cost
                rejected.total += 1
            else:
                rejected.add(n, f"line {n + 1}: not valid JSON ({exc})")
            continue
        yield n, obj


def _too_many(settings: Settings, n: int | None = None) -> TooLarge:
    count = str(n) if n is not None else f"more than {settings.max_items_per_request}"
    return TooLarge(
        f"items: {count} in one request, limit {settings.max_items_per_request} (GRAPE_MAX_ITEMS_PER_REQUEST); "
        "split the upload"
    )
