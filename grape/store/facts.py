"""An item's facts: per candidate its source and the length of its response, stored beside the item at ingest.

The reads that decide from scores (`/compare`, `/summary`, a selection's pass over the pool) need of an item only
its id, its candidates' sources and their responses' lengths: reading these small records instead of the items
(compressed, with every response) is what keeps those reads from decompressing and parsing the pool's texts.

A record is the JSON `[[chars, ...], [source, ...]]`, one entry per candidate in candidate order; `chars` is
`len(response)`, in code points as Python counts them. Items stored before facts existed have none: a reader
derives them from the item (`encode`, then reads them as any other).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

Facts = tuple[list[int], list[str]]
"""(response lengths, sources), one entry per candidate."""


def encode(item: dict[str, Any]) -> bytes:
    """The stored record of an item's facts (a candidate without a response or source, as some protocol tests
    store, gets 0 and null: every item the gateway stores has both)."""
    cands = item["candidates"]
    return orjson.dumps([[len(c.get("response", "")) for c in cands], [c.get("source") for c in cands]])


def decode_many(raws: Sequence[bytes]) -> list[Facts]:
    """The facts of several stored records (none of them missing), decoded in one call."""
    if not raws:
        return []
    return [(chars, sources) for chars, sources in orjson.loads(b"[" + b",".join(raws) + b"]")]


def split_many(raws: Sequence[bytes]) -> tuple[np.ndarray, list[bytes]] | None:
    """Several stored records (none missing) as (every response length, in order, as one array; each record's
    sources as its JSON bytes): a page's records share a few source lists, so a reader decodes each list once
    (grape.strategies.columns.SourceTable.codes_of_json). None when a record is not of that form."""
    chars: list[bytes] = []
    sources: list[bytes] = []
    for raw in raws:
        cut = raw.find(b"],[")  # the lengths come first: digits and commas only
        if cut < 3 or raw[:2] != b"[[" or raw[-1:] != b"]":
            return None
        chars.append(raw[2:cut])
        sources.append(raw[cut + 2 : -1])
    if not raws:
        return np.zeros(0, dtype=np.int64), []
    try:
        lengths = np.array(orjson.loads(b"[" + b",".join(chars) + b"]"), dtype=np.int64)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    return lengths, sources
