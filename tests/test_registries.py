"""Facts written once: the strategies' records, the one model of the selection parameters, the hyperparameters'
routes to TRL, the score kinds and the scoring backends. What reads them (the gateway, the experiment rules, the
CLI's help and flags, the trainer) follows a change of the record with no edit of its own: shown here with a
strategy added in a temporary registry."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from grape.cli import build_parser, help_text, subcommands
from grape.cli_options import parse_hp
from grape.experiment_cli import experiment_body
from grape.experiments import ArmSpec, arm_params, shares_draw
from grape.jobs import Hyperparameters, JobRequest, TrainSetup, hp_route, trl_arguments
from grape.keys import Keys
from grape.score_kinds import KINDS, SCORE_KINDS, TASKS, ScoreTask
from grape.scoring_backends import BACKEND_NAMES
from grape.settings import Settings
from grape.store import datasets
from grape.strategies import (
    STRATEGIES,
    Pick,
    ScoredItem,
    SelectParams,
    StrategySpec,
    get_strategy,
    reading,
    strategy_specs,
)
from grape.strategies.base import collected, streamed
from grape.train_cli import job_body
from service.errors import Unprocessable
from service.experiment_schemas import ExperimentCreate
from service.experiments import check_arms
from tests.conftest import MODEL
from tests.test_selection_parity import N_ITEMS, scored_dataset  # noqa: F401 - the fixture, used by name
from tests.test_strategies import synthetic

# ---- a strategy added by a contributor: its function and its record, nothing else --------------------------


def shortest(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    """The n pairs with the shortest responses (target-model tokens), at most k per instruction."""
    ranked = sorted(
        ((int(sc["tokens"]), o, i, row) for o, row in enumerate(rows) for i, sc in enumerate(row.scores)),
        key=lambda p: p[:3],
    )
    kept: dict[str, int] = {}
    out = 0
    for tokens, _, i, row in ranked:
        if params.n is not None and out >= params.n:
            return
        if kept.get(row.item["id"], 0) >= params.k:
            continue
        kept[row.item["id"]] = kept.get(row.item["id"], 0) + 1
        out += 1
        yield Pick(row.item, i, float(tokens), out)


SHORTEST = StrategySpec(
    name="shortest",
    summary="The n pairs with the shortest responses, at most k per instruction.",
    needs=(),
    per_instruction=False,
    streams=False,
    params=("k", "n"),
    accumulate=collected(shortest),
    texts=True,
    columns=None,
)


def first_each(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    for row in rows:
        yield Pick(row.item, 0, 0.0, 1)


FIRST_EACH = StrategySpec(
    name="first-each",
    summary="Per instruction, its first candidate.",
    needs=(),
    per_instruction=True,
    streams=True,
    params=("k",),
    accumulate=streamed(first_each),
    texts=True,
    columns=None,
)


def test_an_added_strategy_is_in_the_records_the_help_and_the_experiment_rules() -> None:
    assert "shortest" not in STRATEGIES
    with STRATEGIES.temporary(SHORTEST.name, SHORTEST), STRATEGIES.temporary(FIRST_EACH.name, FIRST_EACH):
        names = [s.name for s in strategy_specs()]
        assert names[-3:] == ["shortest", "first-each", "source:<name>"]  # registry order, the family last
        assert get_strategy("shortest") is SHORTEST and reading("n")[-1] == "shortest"
        for command in ("export", "compare", "train", "experiment"):
            text = " ".join(help_text(command).split())  # unwrapped
            assert "shortest" in text and "first-each" in text, command
        export = " ".join(help_text("export").split())
        assert "read by longest, deita, ifd, random, shortest)" in export  # --n: who reads the budget
        # the experiment rules: a per-instruction arm joins the shared draw, a pool-wide one keeps its own top n
        assert not shares_draw(ArmSpec(strategy="shortest")) and shares_draw(ArmSpec(strategy="first-each"))
        assert arm_params(ArmSpec(strategy="shortest"), 7).n == 7
        assert arm_params(ArmSpec(strategy="first-each"), 7).n is None
        body = {"dataset_id": "ds-000000000000", "budget": {"pairs": 7}, "evaluation": {"tasks": ["t"]}}
        meta = {"target_model": MODEL}
        check_arms(ExperimentCreate(**body, arms=[{"strategy": "shortest", "n": 7}, {"strategy": "first-each"}]), meta)
        with pytest.raises(Unprocessable, match=r"arms\[0\]\.n: first-each picks a response per instruction"):
            check_arms(ExperimentCreate(**body, arms=[{"strategy": "first-each", "n": 7}]), meta)
    assert "shortest" not in STRATEGIES and "shortest" not in help_text("export")


def test_an_added_strategy_is_served_and_materialized_alike(
    scored_dataset: tuple[TestClient, str],  # noqa: F811 - the fixture of test_selection_parity
    rclient: redis.Redis,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """The gateway's /selection and /compare and the trainer's materialization run it from its record alone."""
    api, ds = scored_dataset
    with STRATEGIES.temporary(SHORTEST.name, SHORTEST):
        r = api.get(f"/v1/datasets/{ds}/selection", params={"strategy": "shortest", "n": 40, "k": 2})
        assert r.status_code == 200, r.text
        served = [orjson.loads(line) for line in r.content.splitlines()]
        n = datasets.write_selection(rclient, keys, ds, "shortest", SelectParams(n=40, k=2), tmp_path / "s.jsonl")
        assert n == 40 and [orjson.loads(x) for x in (tmp_path / "s.jsonl").read_bytes().splitlines()] == served
        assert [rec["score"] for rec in served] == sorted(rec["score"] for rec in served)
        cmp = api.get(f"/v1/datasets/{ds}/compare", params={"strategies": "shortest,grape", "n": 40}).json()
        assert [s["selected"] for s in cmp["strategies"]][0] == 40 and cmp["items"] < N_ITEMS


# ---- every strategy's record says what its code does --------------------------------------------------------


CHANGED: dict[str, Any] = {"k": 2, "reduce": "sum", "n": 5, "tau": 0.3, "seed": 1}


def _rows() -> list[ScoredItem]:
    rows = synthetic(n_items=30)
    for j, row in enumerate(rows):  # the local (LALP) results too, so every strategy has what it needs
        if j % 3 == 0:  # two candidates of source b: source:b's k matters
            row.item["candidates"][0]["source"] = "b"
        local = [{"local": -((j * 7 + i * 3) % 11) / 5.0} for i in range(len(row.scores))]
        row.extra["local"] = local
    return rows


def _run(spec: StrategySpec, rows: list[ScoredItem], params: SelectParams) -> list[tuple[Any, ...]]:
    return [(p.item["id"], p.candidate, p.score, p.rank) for p in spec(rows, params)]


@pytest.mark.parametrize("spec", strategy_specs(), ids=lambda s: s.name)
def test_a_strategy_reads_exactly_the_parameters_its_record_names(spec: StrategySpec) -> None:
    assert set(CHANGED) == set(SelectParams.model_fields)
    rows = _rows()
    spec = get_strategy(spec.name.replace("<name>", "b"))
    base = _run(spec, rows, SelectParams())
    assert base, spec.name
    for name, value in CHANGED.items():
        changed = _run(spec, rows, SelectParams(**{name: value}))
        if name in spec.params:
            assert changed != base, f"{spec.name} declares {name} but does not read it"
        else:
            assert changed == base, f"{spec.name} reads {name} without declaring it"
    assert set(spec.needs) <= {t.value for t in ScoreTask}
    if spec.streams:  # decided one instruction at a time: a page alone gives that page's picks
        assert _run(spec, rows[:7], SelectParams()) + _run(spec, rows[7:], SelectParams()) == base


def test_a_record_is_complete_and_checked() -> None:
    fields = {f.name for f in dataclasses.fields(StrategySpec)}
    assert fields == {
        "name",
        "summary",
        "needs",
        "per_instruction",
        "streams",
        "params",
        "accumulate",
        "texts",
        "columns",
    }
    with pytest.raises(TypeError):
        StrategySpec(name="x", summary="y", needs=(), per_instruction=True, streams=True, params=())  # type: ignore[call-arg]
    good = dataclasses.asdict(SHORTEST) | {"accumulate": SHORTEST.accumulate}
    for bad, why in (
        ({"params": ("k", "budget")}, "not selection parameters"),
        ({"needs": ("ratings",)}, "score tasks are"),
        ({"summary": "two\nlines"}, "one-line summary"),
    ):
        with pytest.raises(ValueError, match=why):
            StrategySpec(**good | bad)


# ---- the selection parameters: one model, one set of bounds ------------------------------------------------


def _bounds(schema: dict[str, Any]) -> dict[str, Any]:
    """A property's type and bounds, whatever its description."""
    return {k: v for k, v in schema.items() if k not in ("description", "title") and (k, v) != ("default", None)}


def test_the_selection_parameters_have_one_set_of_bounds(api: TestClient) -> None:
    one = {name: _bounds(p) for name, p in SelectParams.model_json_schema()["properties"].items()}
    assert set(one) == {"k", "reduce", "n", "tau", "seed"}
    paths = api.get("/openapi.json").json()["paths"]
    for route in ("/v1/datasets/{dataset_id}/selection", "/v1/datasets/{dataset_id}/compare"):
        query = {p["name"]: _bounds(p["schema"]) for p in paths[route]["get"]["parameters"] if p["in"] == "query"}
        assert {name: query[name] for name in one} == one, route
    for model in (JobRequest, ArmSpec):
        props = model.model_json_schema()["properties"]
        assert {name: _bounds(props[name]) for name in one} == one, model.__name__
    ds = api.post("/v1/datasets", json={"name": "x", "target_model": MODEL}).json()["id"]
    # the bounds a job always had are the routes' now: these were accepted by /selection before
    for query in ({"n": 100_000_001}, {"seed": -1}, {"seed": 2**32}, {"k": 1001}, {"tau": 1.5}):
        r = api.get(f"/v1/datasets/{ds}/selection", params=query)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", next(iter(query))], (query, r.text)
    # an arm's extra checks, beside the bounds: one response per instruction, and no arm of 0 pairs
    for bad in ({"k": 2}, {"n": 0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            ArmSpec(strategy="grape", **bad)


def test_every_selection_parameter_is_a_flag_typed_by_the_model() -> None:
    commands = subcommands(build_parser())
    for command in ("export", "compare", "train"):
        flags = {a.dest: a for a in commands[command]._actions}
        for name in SelectParams.model_fields:
            assert flags[name].default is None, (command, name)  # unset: the gateway's default applies
        assert flags["reduce"].choices == list(typing.get_args(SelectParams.model_fields["reduce"].annotation))
        with pytest.raises(SystemExit):
            commands[command].parse_args(["ds", "-o", "x", "--k", "two"] if command == "export" else ["ds", "--k", "x"])


# ---- hyperparameters: each one reaches TRL, where its field says --------------------------------------------


def _other_value(name: str) -> Any:
    """A valid value of the field other than its default, by its type: another choice, the other truth value,
    a number within its bounds, a template name."""
    field = Hyperparameters.model_fields[name]
    default = field.get_default()
    types_ = [t for t in (typing.get_args(field.annotation) or (field.annotation,)) if t is not type(None)]
    if typing.get_origin(field.annotation) is typing.Literal:
        types_ = [field.annotation]
    options: list[Any] = []
    for t in types_:
        if typing.get_origin(t) is typing.Literal:
            options += typing.get_args(t)
        elif t is bool:
            options += [True, False]
        elif t in (int, float):
            options += [t(3), t(64), 0.5]
        elif t is str:
            options += ["chatml"]
    for value in options:
        if value == default and type(value) is type(default):
            continue
        try:
            Hyperparameters(**{name: value})
        except ValidationError:
            continue
        return value
    raise AssertionError(f"no other value found for {name}")


SETUP = TrainSetup(
    lora=False,
    accelerator=False,
    save_total_limit=50,
    sft_fields=frozenset(f.name for f in dataclasses.fields(__import__("trl").SFTConfig)),
    chat=True,
    model=MODEL,
    context=None,
)


def _flat(args: dict[str, Any]) -> dict[str, Any]:
    return {f"{k}.{kk}" if isinstance(v, dict) else k: vv for k, v in args.items() for kk, vv in _items(v)}


def _items(v: Any) -> list[tuple[str, Any]]:
    return list(v.items()) if isinstance(v, dict) else [("", v)]


@pytest.mark.parametrize("name", list(Hyperparameters.model_fields))
def test_every_allowed_hyperparameter_reaches_trl(name: str) -> None:
    """Set alone to another value, the field changes what TRL is given, at the places its route declares;
    those are real SFTConfig arguments (a route to the trainer's own setup is not one)."""
    route = hp_route(name)
    value = _other_value(name)
    part = {"trainer": route.trainer}
    before = _flat(trl_arguments(Hyperparameters(), SETUP, **part))
    after = _flat(trl_arguments(Hyperparameters(**{name: value}), SETUP, **part))
    changed = {k for k in before.keys() | after.keys() if before.get(k, "unset") != after.get(k, "unset")}
    assert changed, f"{name}={value!r} does not reach TRL"
    assert changed <= set(route.targets(name)), (name, changed, route.targets(name))
    if not route.trainer:
        assert all(t.partition(".")[0] in SETUP.sft_fields for t in changed), changed
    # the other part of TRL's arguments is untouched
    other = {"trainer": not route.trainer}
    assert trl_arguments(Hyperparameters(**{name: value}), SETUP, **other) == trl_arguments(
        Hyperparameters(), SETUP, **other
    )


def test_the_loss_setting_follows_the_datas_format() -> None:
    hp = Hyperparameters(assistant_only_loss=True)
    plain = dataclasses.replace(SETUP, chat=False)
    assert trl_arguments(hp, SETUP)["assistant_only_loss"] is True and "completion_only_loss" not in trl_arguments(
        hp, SETUP
    )
    assert (trl_arguments(hp, plain)["assistant_only_loss"], trl_arguments(hp, plain)["completion_only_loss"]) == (
        False,
        True,
    )
    with pytest.raises(ValueError, match="longer than the context"):
        trl_arguments(Hyperparameters(max_length=4096), dataclasses.replace(SETUP, context=2048))


def test_one_hp_parser_for_train_and_experiment() -> None:
    commands = subcommands(build_parser())
    hp = ["--hp", "optim=sgd", "--hp", "max_length=null", "--hp", "chat_template=chatml", "--lr", "0.001"]
    train = job_body(commands["train"].parse_args(["ds", *hp]))
    exp = experiment_body(
        commands["experiment"].parse_args(["ds", "--arms", "grape", "--pairs", "2", "--tasks", "t", *hp])
    )
    want = {"learning_rate": 0.001, "optim": "sgd", "max_length": None, "chat_template": "chatml"}
    assert train["hyperparameters"] == exp["hyperparameters"] == want
    assert "strategy" not in train and "k" not in train  # unset: the gateway's defaults
    with pytest.raises(ValueError, match="give KEY=VALUE"):
        parse_hp(["optim"])


# ---- score kinds and scoring backends: their records, read by the CLIs and the settings ------------------------


def test_score_kinds_tasks_and_backends_are_read_from_their_records() -> None:
    assert [t.task for t in TASKS] == list(ScoreTask) and list(SCORE_KINDS) == [k.name for k in KINDS]
    commands = subcommands(build_parser())
    scores = next(a for a in commands["scores"]._actions if a.dest == "scores")
    assert scores.choices == list(SCORE_KINDS)
    assert Settings.choices("backend") == ["auto", *BACKEND_NAMES]
    from workers.backends import BACKENDS
    from workers.main import build_parser as worker_parser

    assert BACKENDS.in_order() == list(BACKEND_NAMES)
    worker = {a.dest: a for a in worker_parser(Settings())._actions}
    assert worker["task"].choices == [t.value for t in ScoreTask]
    assert worker["backend"].choices == ["auto", *BACKEND_NAMES]
