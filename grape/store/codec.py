"""How an item and a task's scores are stored in their hashes: one encode and one decode function per record type.

Every reader of `keys.items` and of a task's results hash (`keys.task_results`: scores, unconditioned, ratings,
embeddings) decodes through `decode_item` / `decode_scores`, so a record written in any of the forms below reads
back equal to what was written:

- an item: its JSON, compressed with raw deflate (zlib, `GRAPE_ITEM_COMPRESSION` level) behind the byte 0x01 when
  that is shorter; else (level 0, or a record too small to gain) its JSON as it was always stored;
- a task's scores (a list of one dict per candidate): when every dict has the same fields in the same order, the
  byte 0x02 then the JSON `[[field, ...], [value, ...], ...]` (the field names once, not once per candidate);
  else its JSON.

A JSON record starts with `{` or `[`, never with 0x01 or 0x02: records stored before this encoding still read.
No Lua script decodes these records (the ingest and result scripts store them as given).
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson

DEFLATE = b"\x01"
COLUMNS = b"\x02"
DEFAULT_LEVEL = 1
"""zlib level of item records: 1 is the fastest and keeps ~37% of the bytes of the dev pool's JSON (6: ~32%, at
half the speed): ingest throughput matters more than the last 5%."""


def encode_item(item: dict[str, Any], level: int = DEFAULT_LEVEL) -> bytes:
    """An item's stored record (compressed when `level` > 0 and that is shorter)."""
    raw = orjson.dumps(item)
    if level <= 0:
        return raw
    packed = zlib.compress(raw, level, wbits=-15)  # raw deflate: no header or checksum to store
    return DEFLATE + packed if len(packed) + 1 < len(raw) else raw


def decode_item(raw: bytes | str) -> dict[str, Any]:
    """The item of a stored record, in any form `encode_item` wrote (or the plain JSON of older records)."""
    if isinstance(raw, str):
        raw = raw.encode()
    if raw[:1] == DEFLATE:
        raw = zlib.decompress(raw[1:], wbits=-15)
    return orjson.loads(raw)


def encode_scores(scores: list[dict[str, Any]]) -> bytes:
    """A task's stored result for one item: per candidate a dict, its field names written once when they agree."""
    if scores and all(isinstance(s, dict) for s in scores):
        fields = list(scores[0])
        if all(list(s) == fields for s in scores):
            return COLUMNS + orjson.dumps([fields, *([s[f] for f in fields] for s in scores)])
    return orjson.dumps(scores)


def decode_scores(raw: bytes | str) -> Any:
    """The result `encode_scores` stored (or the plain JSON of older records)."""
    if isinstance(raw, str):
        raw = raw.encode()
    if raw[:1] == COLUMNS:
        fields, *rows = orjson.loads(raw[1:])
        return [dict(zip(fields, row, strict=True)) for row in rows]
    return orjson.loads(raw)
