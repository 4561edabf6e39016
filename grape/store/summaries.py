"""A dataset's kept `/summary` tally, in Redis: a gateway that starts (or another replica) continues from where the
last one stopped instead of reading the pool again.

Per dataset and `reduce` (keys.summary): a hash holding `gen` (bumped by every save), `pos` (the upload-order
position the tally has read up to) and `state` (JSON: scored items counted, per-source counters, the ids before
`pos` that were not scored when read, and how many values each array holds), and two strings of float64 values,
every candidate's score and each item's chosen score, appended as scores arrive (8 bytes a pair). A save appends
only what was counted since the last one and is refused when the stored `gen` is not the one the tally was read
at (another gateway saved meanwhile: this one reads the stored tally next time) or when the dataset is gone (its
keys are not recreated); the dataset's removal deletes these keys with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from grape.keys import Keys
from grape.redis_client import as_str
from grape.store.io import Call, Lua, Plan, one, script

REDUCES = ("mean", "sum")
"""The `reduce` values a summary is kept for (the route accepts these only)."""

LOAD = Lua("""
-- KEYS: summary hash, all scores, chosen scores   (one step: a save cannot fall between the three reads)
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3])}
""")

SAVE = Lua("""
-- KEYS: metadata, summary hash, all scores, chosen scores
-- ARGV: the gen the tally was read at ('' for none), pos, state, new all scores, new chosen scores
-- answers the new gen, or -1 when refused (another save came first, or the dataset is gone)
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if (redis.call('HGET', KEYS[2], 'gen') or '') ~= ARGV[1] then return -1 end
if ARGV[1] == '' then
  redis.call('SET', KEYS[3], ARGV[4])
  redis.call('SET', KEYS[4], ARGV[5])
else
  redis.call('APPEND', KEYS[3], ARGV[4])
  redis.call('APPEND', KEYS[4], ARGV[5])
end
redis.call('HSET', KEYS[2], 'pos', ARGV[2], 'state', ARGV[3])
return redis.call('HINCRBY', KEYS[2], 'gen', 1)
""")


@dataclass(frozen=True)
class Stored:
    """A kept tally as read: its `gen` (what a save must name), `pos`, `state` and score arrays' bytes."""

    gen: str
    pos: int
    state: dict[str, Any]
    all_scores: bytes | memoryview
    chosen: bytes | memoryview


def _keys(keys: Keys, dataset_id: str, reduce: str) -> list[str]:
    return [
        keys.summary(dataset_id, reduce),
        keys.summary(dataset_id, reduce, "all"),
        keys.summary(dataset_id, reduce, "chosen"),
    ]


def all_keys(keys: Keys, dataset_id: str) -> list[str]:
    """Every key of a dataset's kept summaries (its removal deletes them)."""
    return [k for reduce in REDUCES for k in _keys(keys, dataset_id, reduce)]


def gen(keys: Keys, dataset_id: str, reduce: str) -> Plan[str]:
    """The stored tally's generation ('' when none is stored): whether a kept copy is still the stored one."""
    found = yield from one("hget", keys.summary(dataset_id, reduce), "gen")
    return as_str(found) if found is not None else ""


def load(keys: Keys, dataset_id: str, reduce: str) -> Plan[Stored | None]:
    """The stored tally, or None."""
    ((head, all_scores, chosen),) = yield [script(LOAD.call(_keys(keys, dataset_id, reduce), []))]
    fields = dict(zip(head[::2], head[1::2], strict=True)) if isinstance(head, list) else dict(head)
    fields = {as_str(k): v for k, v in fields.items()}
    if "gen" not in fields or "state" not in fields:
        return None
    state = orjson.loads(fields["state"])
    all_scores, chosen = all_scores or b"", chosen or b""
    if len(all_scores) < 8 * state["all"] or len(chosen) < 8 * state["chosen"]:
        return None  # not as the state says (never, short of a hand edit): count afresh
    return Stored(  # views, not copies: a pool's scores are 8 bytes a pair
        as_str(fields["gen"]),
        int(as_str(fields["pos"])),
        state,
        memoryview(all_scores)[: 8 * state["all"]],
        memoryview(chosen)[: 8 * state["chosen"]],
    )


def save(
    keys: Keys,
    dataset_id: str,
    reduce: str,
    gen: str,
    pos: int,
    state: dict[str, Any],
    new_all: bytes | memoryview,
    new_chosen: bytes | memoryview,
) -> Call:
    """Append a tally's values counted since `gen` and store its state (`state` names the arrays' full lengths as
    `all` and `chosen`); answers the new gen, or -1 when refused."""
    return SAVE.call(
        [keys.dataset(dataset_id), *_keys(keys, dataset_id, reduce)],
        [gen, pos, orjson.dumps(state), new_all, new_chosen],
    )
