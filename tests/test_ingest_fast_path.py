"""The upload's fast validation (grape.records.stored_if_plain) accepts only what ItemIn accepts and stores the
same form; whatever it leaves to ItemIn is worded as before (tests/test_api_validation.py)."""

from __future__ import annotations

from collections.abc import Callable

import orjson
from conftest import POOL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from grape.records import ItemIn, stored_if_plain
from grape.settings import Settings
from service.ingest import check_item

LIMITS = Settings()


def reference(obj: dict) -> dict | None:
    """What the model-based validation stores, or None when it refuses the item."""
    try:
        return ItemIn.model_validate(obj).stored()
    except ValidationError:
        return None


def same(a: dict | None, b: dict | None) -> bool:
    return orjson.dumps(a) == orjson.dumps(b)  # same values and the same key order


texts = st.one_of(st.sampled_from(["", " ", "\n\t", "x", "user", "robot", "c0", "i" * 257]), st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), texts)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3))
# the values at the edges of what ItemIn accepts, drawn as often as all the others together
EDGES = ["", " ", "\u3000", "robot", "User", "user", "assistant", "i" * 256, "i" * 257, None, 0, 1.5, True, [], {}]
faults = st.one_of(st.sampled_from(EDGES), anything)
ROLES = ["system", "user", "assistant"]
FIELDS = ["id", "instruction", "messages", "candidates"]


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A valid value, or one time in six a fault (an edge value or any JSON value)."""
    return st.integers(0, 5).flatmap(lambda k: faults if k == 0 else valid)


def item_of(f: Callable[[st.SearchStrategy], st.SearchStrategy]) -> st.SearchStrategy:
    """Items whose every field is drawn through `f` (`field`: one time in six a fault); optional keys left out."""
    text, line = f(st.text()), f(st.text(min_size=1).filter(str.strip))
    turn = f(st.fixed_dictionaries({"role": f(st.sampled_from(ROLES)), "content": text}, optional={"x": anything}))
    turns = f(st.lists(turn, max_size=3).map(lambda ts: [*ts, {"role": "user", "content": "q"}]))
    candidate = f(st.fixed_dictionaries({"response": f(st.text(min_size=1))}, optional={"source": f(st.none() | text)}))
    candidates = f(st.lists(candidate, min_size=1, max_size=4))
    ident = f(st.text(min_size=1, max_size=256))
    return st.one_of(
        st.fixed_dictionaries(
            {"instruction": line, "candidates": candidates},
            optional={"id": ident, "dataset": anything, "messages": f(st.none())},
        ),
        st.fixed_dictionaries(
            {"messages": turns, "candidates": candidates}, optional={"id": ident, "instruction": f(st.none())}
        ),
    )


nearly_valid_items = item_of(field)
valid_items = item_of(lambda valid: valid)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nearly_valid_items)
def test_fast_path_never_accepts_what_the_model_refuses_and_stores_the_same(obj: dict) -> None:
    obj = orjson.loads(orjson.dumps(obj))  # what an upload's parser hands over
    fast, ref = stored_if_plain(obj), reference(obj)
    assert fast is None or same(fast, ref), (obj, fast, ref)
    # and the upload's check gives the same answer either way
    try:
        got = check_item(obj, LIMITS)
    except ValueError as exc:
        assert ref is None or "limit" in str(exc), (obj, exc)
    else:
        assert same(got, ref)


@settings(max_examples=500, deadline=None)
@given(valid_items)
def test_valid_items_take_the_fast_path(obj: dict) -> None:
    obj = orjson.loads(orjson.dumps(obj))
    fast = stored_if_plain(obj)
    assert fast is not None and same(fast, reference(obj))


BASES = [
    {"id": "a", "instruction": "Say hi.", "candidates": [{"source": "m", "response": "Hi!"}, {"response": "Yo"}]},
    {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "q"},
        ],
        "candidates": [{"source": None, "response": "r", "extra": 1}],
        "dataset": "d",
    },
]


def places(obj: object, path: tuple = ()) -> list[tuple]:
    """Every place in a JSON value: the paths of its dict values and list elements."""
    out = [path] if path else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += places(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += places(v, (*path, i))
    return out


def test_every_single_fault_anywhere_is_left_to_the_model() -> None:
    """Each place of a few valid items, given each edge value, removed, or beside an added field."""
    checked = 0
    for base in BASES:
        for path in places(base):
            for fault in [*EDGES, "removed"]:
                obj = orjson.loads(orjson.dumps(base))
                parent = obj
                for step in path[:-1]:
                    parent = parent[step]
                if fault == "removed":
                    del parent[path[-1]]
                else:
                    parent[path[-1]] = fault
                fast, ref = stored_if_plain(obj), reference(obj)
                assert fast is None or same(fast, ref), (obj, fast, ref)
                checked += 1
        for name in FIELDS:  # a field added where it does not belong (or set twice)
            for value in EDGES:
                obj = {**base, name: value}
                fast, ref = stored_if_plain(obj), reference(obj)
                assert fast is None or same(fast, ref), (obj, fast, ref)
    assert checked > 300


def test_the_real_pool_takes_the_fast_path_and_stores_what_the_model_stores() -> None:
    rows = [orjson.loads(line) for line in POOL.read_bytes().splitlines() if line.strip()]
    for row in rows:
        fast = stored_if_plain(row)
        assert fast is not None and same(fast, reference(row))
    no_id = {k: v for k, v in rows[0].items() if k != "id"}  # the content hash, as the model path makes it
    assert same(stored_if_plain(no_id), reference(no_id))
