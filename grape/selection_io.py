"""Materializing a selection from Redis, synchronously (the trainer; scripts).

The same walk as the gateway's `/selection` route: the dataset's scored items in upload order, with the
extra task results a strategy `needs`, through a strategy from `grape.strategies`, out as the SFT
records TRL's `SFTTrainer` reads (`{"id", "messages": [..., {"role": "assistant", ...}], "source", ...}`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import redis

from grape.keys import Keys
from grape.redis_client import as_str as _s
from grape.strategies import STRATEGIES, ScoredItem, SelectParams, strategy_needs

PAGE = 500


class SelectionError(ValueError):
    """The selection cannot be made: unknown dataset, unknown strategy, or its scores were not requested."""


def dataset_meta(r: redis.Redis, keys: Keys, dataset_id: str) -> dict[str, str]:
    raw = r.hgetall(keys.dataset(dataset_id))
    if not raw:
        raise SelectionError(f"dataset {dataset_id!r} not found")
    return {_s(k): _s(v) for k, v in raw.items()}


def scored_pages(
    r: redis.Redis, keys: Keys, dataset_id: str, needs: tuple[str, ...] = ()
) -> Iterator[list[ScoredItem]]:
    """Pages of scored items in upload order; unscored and failed items are left out. `needs`: extra
    task results (grape.score_kinds) attached where an item has them."""
    start = 0
    while True:
        ids = r.lrange(keys.order(dataset_id), start, start + PAGE - 1)
        if not ids:
            return
        start += len(ids)
        with r.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.items(dataset_id), ids)
            pipe.hmget(keys.scores(dataset_id), ids)
            for n in needs:
                pipe.hmget(keys.task_results(dataset_id, n), ids)
            raw_items, raw_scores, *extra = pipe.execute()
        page = build_page(raw_items, raw_scores, needs, extra)
        if page:
            yield page


def build_page(
    raw_items: list[Any], raw_scores: list[Any], needs: tuple[str, ...], extra: list[list[Any]]
) -> list[ScoredItem]:
    """ScoredItems from one page of HMGET answers (items, logprob scores, each extra task's results);
    items without scores are left out. Shared by the sync (trainer) and async (gateway) readers."""
    return [
        ScoredItem(
            orjson.loads(it),
            orjson.loads(sc),
            {n: orjson.loads(x[j]) for n, x in zip(needs, extra, strict=True) if x[j] is not None},
        )
        for j, (it, sc) in enumerate(zip(raw_items, raw_scores, strict=True))
        if it is not None and sc is not None
    ]


def selection_records(
    r: redis.Redis, keys: Keys, dataset_id: str, strategy: str, params: SelectParams
) -> Iterator[dict[str, Any]]:
    """The selected SFT records, in the strategy's order (per-instruction strategies stream page by page)."""
    dataset_meta(r, keys, dataset_id)
    try:
        select = STRATEGIES.get(strategy)
        needs = strategy_needs(strategy)
    except (KeyError, ValueError) as exc:
        raise SelectionError(f"strategy: {exc}") from None
    if getattr(select, "per_item", False):
        for page in scored_pages(r, keys, dataset_id, needs):
            for pick in select(page, params):
                yield pick.record()
        return
    rows: list[ScoredItem] = []
    for page in scored_pages(r, keys, dataset_id, needs):
        rows.extend(page)
    for pick in select(rows, params):
        yield pick.record()


def write_selection(
    r: redis.Redis, keys: Keys, dataset_id: str, strategy: str, params: SelectParams, path: str | Path
) -> int:
    """Write the selection as NDJSON (written to a temporary name, then renamed); returns the record count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with open(tmp, "wb") as f:
        for rec in selection_records(r, keys, dataset_id, strategy, params):
            f.write(orjson.dumps(rec) + b"\n")
            n += 1
    os.replace(tmp, path)
    return n
