"""How an item and a task's scores are stored in their hashes: one encode and one decode function per record type.

Every reader of `keys.items` and of a task's results hash (`keys.task_results`: scores, unconditioned, ratings,
embeddings) decodes through `decode_item` / `decode_scores`, so a record written in any of the forms below reads
back equal to what was written:

- an item: the byte 0x04, then its parts, each compressed on its own (a zstd frame at the `GRAPE_ITEM_COMPRESSION`
  level, or the part as it is when a frame is not shorter): first the item's JSON with every response empty, then
  each candidate's response. A selection's export needs one response of an item: it decompresses and parses that
  one and the small rest (`decode_item_for`), ~2x less work an item than the whole JSON in one frame, for ~38% more
  bytes (704 B a pair of the dev pool instead of 509). The header after 0x04: the number of parts (u16), then where
  each part ends in the record (u32: the next part starts there; its top bit set: the part is stored as it is).
  An item of another shape (a candidate without a string response, as some protocol tests store) is the byte 0x03
  then one zstd frame of its JSON, as the code before the parts wrote every item; an item whose record would not
  be shorter than its JSON (level 0, or a tiny item), its JSON, as items were first stored. Records of 0x01 (raw
  deflate of the JSON, the code before zstd) still read;
- a task's scores (a list of one dict per candidate): when every dict has the same fields in the same order, the
  byte 0x02 then the JSON `[[field, ...], [value, ...], ...]` (the field names once, not once per candidate);
  else its JSON.

A JSON record starts with `{` or `[`, never with 0x01, 0x02, 0x03 or 0x04: records stored in any earlier form
still read.
No Lua script decodes these records (the ingest and result scripts store them as given).
"""

from __future__ import annotations

import functools
import struct
import threading
import zlib
from collections.abc import Collection, Sequence
from typing import Any

import orjson
import zstandard

DEFLATE = b"\x01"
COLUMNS = b"\x02"
ZSTD = b"\x03"
PARTS = b"\x04"
_END = 0x7FFF_FFFF
_AS_IS = 0x8000_0000  # a part's end with this bit: the part is stored as it is (a frame would not be shorter)
DEFAULT_LEVEL = 1
"""zstd level of item records: 1 keeps ~47% of the bytes of the dev pool's JSON in parts (~35% as one frame of the
whole item, the form before the parts; zlib level 1, the codec before that, kept ~37% at ~1/3 of the speed); 3
keeps ~1% less at ~4/5 of the speed. Ingest throughput is mostly this compression."""

_local = threading.local()  # zstd contexts are not thread-safe: one per thread (and level), reused


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    made: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    if level not in made:
        made[level] = zstandard.ZstdCompressor(level=level)  # frames carry their size: one-shot decompression
    return made[level]


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def encode_item(item: dict[str, Any], level: int = DEFAULT_LEVEL) -> bytes:
    """An item's stored record (compressed when `level` > 0 and that is shorter)."""
    return encode_items([item], level)[0]


def encode_items(items: Sequence[dict[str, Any]], level: int = DEFAULT_LEVEL) -> list[bytes]:
    """The stored records of several items, as `encode_item` gives each: their parts compressed in one call (a
    chunk's thousands of frames without the GIL taken back and forth between them, which with an upload per
    thread cost more than the compression)."""
    raws = [orjson.dumps(it) for it in items]
    if level <= 0 or not items:
        return raws
    split = [_parts_of(it) for it in items]
    inputs = [part for parts, raw in zip(split, raws, strict=True) for part in (parts if parts is not None else [raw])]
    frames = iter(_compress_all(inputs, level))
    out = []
    for parts, raw in zip(split, raws, strict=True):
        if parts is None:
            packed: bytes | None = ZSTD + next(frames)
        else:
            packed = _parts_record(parts, [next(frames) for _ in parts])
        out.append(packed if packed is not None and len(packed) < len(raw) else raw)
    return out


def _compress_all(inputs: list[bytes], level: int) -> list[bytes]:
    compressor = _zstd_compressor(level)
    # the batch call is the C backend's (python-zstandard calls it experimental) and refuses an empty input
    batch = getattr(compressor, "multi_compress_to_buffer", None)
    if batch is not None and all(inputs):
        return [frame.tobytes() for frame in batch(inputs)]
    return [compressor.compress(x) for x in inputs]


def _parts_of(item: dict[str, Any]) -> list[bytes] | None:
    """An item's parts: its JSON with every response empty, then each response; None for an item of another
    shape (a candidate without a string response)."""
    cands = item.get("candidates")
    if not isinstance(cands, list) or not all(isinstance(c, dict) and type(c.get("response")) is str for c in cands):
        return None
    if len(cands) >= 0xFFFF:
        return None
    rest = {**item, "candidates": [{**c, "response": ""} for c in cands]}  # each key where it was
    return [orjson.dumps(rest), *(c["response"].encode() for c in cands)]


def _parts_record(parts: list[bytes], frames: list[bytes]) -> bytes | None:
    """The 0x04 record of the parts, each stored as its frame when that is shorter, else as it is."""
    body = [frame if len(frame) < len(part) else part for part, frame in zip(parts, frames, strict=True)]
    ends: list[int] = []
    at = 3 + 4 * len(parts)
    for part, stored in zip(parts, body, strict=True):
        at += len(stored)
        ends.append(at | _AS_IS if stored is part else at)
    if at > _END:
        return None
    return b"".join((PARTS, struct.pack(f"<H{len(ends)}I", len(ends), *ends), *body))


@functools.lru_cache(maxsize=256)
def _header(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}I")


def _parts(raw: bytes, wanted: Collection[int] | None) -> dict[str, Any]:
    """The item of a 0x04 record with the responses of the `wanted` candidates (all with None); every other
    response stays as stored in the first part, an empty string."""
    count = raw[1] | raw[2] << 8
    ends = _header(count).unpack_from(raw, 3)
    decompress = _zstd_decompressor().decompress
    first = raw[3 + 4 * count : ends[0] & _END]
    item = orjson.loads(first if ends[0] & _AS_IS else decompress(first))
    cands = item["candidates"]
    for c in range(count - 1) if wanted is None else wanted:
        if 0 <= c < count - 1:
            end = ends[c + 1]
            data = raw[ends[c] & _END : end & _END]
            cands[c]["response"] = (data if end & _AS_IS else decompress(data)).decode()
    return item


def decode_item(raw: bytes | str) -> dict[str, Any]:
    """The item of a stored record, in any form `encode_item` wrote now or before (or the plain JSON of older
    records)."""
    if isinstance(raw, str):
        raw = raw.encode()
    tag = raw[:1]
    if tag == PARTS:
        return _parts(raw, None)
    if tag == ZSTD:
        raw = _zstd_decompressor().decompress(memoryview(raw)[1:])
    elif tag == DEFLATE:
        raw = zlib.decompress(memoryview(raw)[1:], wbits=-15)
    return orjson.loads(raw)


def decode_item_for(raw: bytes | str, candidates: Collection[int]) -> dict[str, Any]:
    """The item of a stored record with the responses of `candidates` (indexes) only: in the 0x04 form every other
    candidate's `response` is an empty string, its other fields as stored; in the older forms the whole item. What
    a selection's record of some candidates reads (the others' responses are neither decompressed nor parsed)."""
    if isinstance(raw, str):
        raw = raw.encode()
    return _parts(raw, candidates) if raw[:1] == PARTS else decode_item(raw)


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


def decode_score_tables(raws: Sequence[bytes]) -> list[tuple[list[str], list[list[Any]]]]:
    """Several stored results (none missing) as (field names, one row of values per candidate): what `decode_scores`
    gives without a dict per candidate, the columnar records of a page parsed in one call (the reads that rank a
    page of items by their scores)."""
    if all(raw[:1] == COLUMNS for raw in raws):
        return [(fields, rows) for fields, *rows in orjson.loads(b"[" + b",".join(raw[1:] for raw in raws) + b"]")]
    out: list[tuple[list[str], list[list[Any]]]] = []
    for raw in raws:
        scores = decode_scores(raw)
        fields = list(scores[0]) if scores and isinstance(scores[0], dict) else []
        out.append((fields, [[s.get(f) for f in fields] if isinstance(s, dict) else [] for s in scores]))
    return out


_BRACKETS = bytes.maketrans(b"[]", b"  ")


def decode_score_matrix(raws: Sequence[bytes]) -> tuple[list[str], Any, Any] | None:
    """Several stored results (none missing) in the columnar form with the same field names, as (the field names,
    every value as one float64 matrix: a row per candidate, a column per field, and the rows of each record), parsed
    in one call with no object per candidate; None when a record is in another form (then `decode_score_tables`).
    `encode_scores` writes a row of exactly the fields' length for each candidate, so the values' order alone
    places them."""
    import numpy as np

    if not raws:
        return None
    first = raws[0]
    head = first[: first.find(b"],") + 2]  # COLUMNS, then `[[field, ...],`
    if first[:1] != COLUMNS or len(head) < 4 or not all(raw.startswith(head) for raw in raws):
        return None
    fields = orjson.loads(head[1:-1] + b"]")[0]
    if not fields or not all(isinstance(f, str) for f in fields):
        return None
    body = b",".join(raw[len(head) :] for raw in raws).translate(_BRACKETS)
    try:
        values = np.array(orjson.loads(b"[" + body + b"]"), dtype=np.float64)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    rows = np.fromiter((raw.count(b"[", len(head)) for raw in raws), dtype=np.int64, count=len(raws))
    if values.ndim != 1 or values.size != int(rows.sum()) * len(fields):
        return None
    return fields, values.reshape(-1, len(fields)), rows
