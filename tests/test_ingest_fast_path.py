"""The upload's fast validation (grape.records.stored_if_plain) accepts only what ItemIn accepts and stores the
same form; whatever it leaves to ItemIn is worded as before (tests/test_api_validation.py)."""

from __future__ import annotations

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


texts = st.one_of(st.sampled_from(["", " ", "\n\t", "x", "user", "c0"]), st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), texts)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3))
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "robot", "User"]), scalars)


def maybe(key: str, value: st.SearchStrategy) -> st.SearchStrategy:
    """{key: value}, {} (the key left out) or {key: something else entirely}."""
    return st.one_of(st.builds(lambda v: {key: v}, value), st.just({}), st.builds(lambda v: {key: v}, anything))


def merged(*parts: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(*parts).map(lambda ds: {k: v for d in ds for k, v in d.items()})


turns = merged(maybe("role", roles), maybe("content", texts), maybe("extra", anything))
candidates = merged(maybe("source", st.one_of(st.none(), texts)), maybe("response", texts), maybe("n", anything))
items = merged(
    maybe("id", st.one_of(st.none(), texts, st.just("i" * 256), st.just("i" * 257))),
    maybe("instruction", st.one_of(st.none(), texts)),
    maybe("messages", st.lists(st.one_of(turns, anything), max_size=3)),
    maybe("candidates", st.lists(st.one_of(candidates, anything), max_size=3)),
    maybe("dataset", anything),
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items)
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


valid_turns = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text()}),
    max_size=3,
).map(lambda ts: [*ts, {"role": "user", "content": "q"}])
valid_candidates = st.lists(
    st.fixed_dictionaries(
        {"response": st.text(min_size=1)}, optional={"source": st.one_of(st.none(), st.text()), "x": anything}
    ),
    min_size=1,
    max_size=4,
)
valid_items = st.one_of(
    st.fixed_dictionaries(
        {"instruction": st.text(min_size=1).filter(str.strip), "candidates": valid_candidates},
        optional={"id": st.text(min_size=1, max_size=256), "dataset": anything},
    ),
    st.fixed_dictionaries({"messages": valid_turns, "candidates": valid_candidates}, optional={"id": st.text(min_size=1)}),
)


@settings(max_examples=1000, deadline=None)
@given(valid_items)
def test_valid_items_take_the_fast_path(obj: dict) -> None:
    obj = orjson.loads(orjson.dumps(obj))
    fast = stored_if_plain(obj)
    assert fast is not None and same(fast, reference(obj))


def test_the_real_pool_takes_the_fast_path_and_stores_what_the_model_stores() -> None:
    rows = [orjson.loads(line) for line in POOL.read_bytes().splitlines() if line.strip()]
    for row in rows:
        fast = stored_if_plain(row)
        assert fast is not None and same(fast, reference(row))
    no_id = {k: v for k, v in rows[0].items() if k != "id"}  # the content hash, as the model path makes it
    assert same(stored_if_plain(no_id), reference(no_id))
