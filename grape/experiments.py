"""Experiments: one model trained per selection strategy on an equal budget, each evaluated, with the base.

Shared by the gateway (which creates and advances experiments), the trainer (which trains an arm on the
selection the experiment stored) and the CLI (which prints the table). Torch-free.

An experiment is one JSON record (`Keys.experiment`), advanced under a short lock (`Keys.experiment_lock`)
by whichever gateway process gets there first, so every step is idempotent and a gateway restart loses
nothing. The selection each arm trains on is stored beside it (`Keys.experiment_selection`, NDJSON):
what exactly was trained on is part of the result.
"""

from __future__ import annotations

import os
import random
import re
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from grape.evaluations import EvaluationSettings
from grape.jobs import Hyperparameters, LoraSpec
from grape.keys import Keys
from grape.store.experiments import SELECTION_PAGE, selection_page, selection_size
from grape.store.io import run
from grape.strategies import SEED_MAX, SelectParams, StrategyName, get_strategy

EXP_ID = re.compile(r"exp-[0-9a-f]{12}")


def new_experiment_id() -> str:
    return f"exp-{uuid.uuid4().hex[:12]}"


def is_experiment_id(value: str) -> bool:
    return EXP_ID.fullmatch(value) is not None


class ExperimentState(StrEnum):
    """Where an experiment is. Terminal states never change again."""

    queued = "queued"  # created; its training jobs are being queued
    training = "training"  # at least one arm's training job has not ended
    evaluating = "evaluating"  # every training job ended; evaluations are queued or running
    succeeded = "succeeded"  # every evaluation ended and at least one arm has results (failed arms say why)
    failed = "failed"  # no arm could be trained and evaluated (see each arm's error)
    cancelled = "cancelled"  # stopped on request; what had not finished was cancelled


TERMINAL = frozenset({ExperimentState.succeeded, ExperimentState.failed, ExperimentState.cancelled})

# metrics where lower is better (lm-eval's perplexity-like metrics); all others: higher is better
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter"})
# which metric of a task the table shows, first found; else the task's first metric
PRIMARY_METRICS = (
    "acc",
    "exact_match",
    "prompt_level_strict_acc",
    "acc_norm",
    "f1",
    "mc2",
    "bleu",
    "word_perplexity",
    "perplexity",
)


# ---- the request --------------------------------------------------------------------------------------


class ArmSpec(SelectParams):
    """One arm: a selection strategy with its parameters, as the selection API takes them. An experiment trains
    one response per instruction (k=1) and gives every arm the same budget: a pool-wide strategy's n is
    budget.pairs (give it or leave it out), a per-instruction one has none (the experiment draws its
    instructions)."""

    model_config = ConfigDict(extra="forbid")

    strategy: StrategyName

    @field_validator("k")
    @classmethod
    def _one_response(cls, k: int) -> int:
        if k != 1:
            raise ValueError(f"an experiment trains one response per instruction: k must be 1 (got {k})")
        return k

    @field_validator("n")
    @classmethod
    def _some_pairs(cls, n: int | None) -> int | None:
        if n == 0:
            raise ValueError("an arm of 0 pairs trains nothing: leave n out (budget.pairs sets it)")
        return n

    def label(self) -> str:
        """A short name for tables: the strategy and its non-default parameters."""
        extra = [f"{k}={v}" for k, v in self.model_dump(exclude={"strategy", "k", "n"}, exclude_defaults=True).items()]
        return f"{self.strategy}({', '.join(extra)})" if extra else self.strategy


def shares_draw(arm: ArmSpec) -> bool:
    """Whether the arm's strategy picks per instruction (its record's `per_instruction`): the experiment then
    draws its instructions, the same for every such arm, instead of letting it take its own top n."""
    return get_strategy(arm.strategy).per_instruction


def arm_params(arm: ArmSpec, pairs: int) -> SelectParams:
    """The selection parameters an arm runs with: k=1; a pool-wide strategy takes `pairs` as its n."""
    return SelectParams(**arm.select_params().model_dump() | {"k": 1, "n": None if shares_draw(arm) else pairs})


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: int = Field(ge=1, le=10_000_000, description="Pairs every arm trains on (the same for all).")


class EvaluationSpec(EvaluationSettings):
    """How every model of the experiment is evaluated (lm-evaluation-harness): the evaluation request's own
    settings and checks, with the batch size left to the evaluator unless given."""

    batch_size: int | Literal["auto"] | None = Field(None, description="lm-eval batch size; default the evaluator's.")


class ExperimentRequest(BaseModel):
    """What a client asks: arms, one budget, shared training settings, how to evaluate."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=200, description="A dataset whose scoring is done.")
    base_model: str | None = Field(
        None, min_length=1, max_length=500, description="Model every arm fine-tunes; default the dataset's target."
    )
    arms: list[ArmSpec] = Field(min_length=1, max_length=16, description="One trained model per arm.")
    budget: Budget
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters (shared by all arms); null: full fine-tuning.")
    evaluation: EvaluationSpec
    include_base: bool = Field(True, description="Evaluate the base model too (the reference row).")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the instructions drawn for the per-instruction arms.")


# ---- fairness: the shared instruction subset ----------------------------------------------------------


def draw_instructions(common: list[str], pairs: int, seed: int) -> list[str]:
    """`pairs` instruction ids drawn with `seed` from `common` (in upload order), returned in upload order."""
    chosen = set(random.Random(f"experiment:{seed}").sample(common, pairs))
    return [i for i in common if i in chosen]


# ---- the stored selection (the trainer's side) ---------------------------------------------------------


def selection_ref(exp_id: str, arm: int) -> str:
    return f"{exp_id}/{arm}"


def parse_ref(ref: str) -> tuple[str, int]:
    exp_id, _, arm = ref.partition("/")
    if not is_experiment_id(exp_id) or not arm.isdigit():
        raise ValueError(f"selection_ref {ref!r}: expected exp-…/<arm index>")
    return exp_id, int(arm)


def write_stored_selection(r: redis.Redis, keys: Keys, ref: str, path: str | Path) -> int:
    """Write an experiment arm's stored selection as NDJSON at `path` (temporary name, then renamed)."""
    exp_id, arm = parse_ref(ref)
    size = run(r, selection_size(keys, exp_id, arm))
    if not size:
        raise ValueError(f"the selection of experiment arm {ref} is not stored (experiment deleted?)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a page at a time, as the gateway serves it
            for start in range(0, size, SELECTION_PAGE):
                page = run(r, selection_page(keys, exp_id, arm, start))
                if not page:
                    raise ValueError(f"the selection of experiment arm {ref} was deleted while it was read")
                f.write(page)
        with open(tmp, "rb") as f:
            records = sum(1 for line in f if line.strip())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return records


# ---- results ------------------------------------------------------------------------------------------


def primary_metric(metrics: dict[str, Any]) -> str | None:
    """The metric a table shows for a task."""
    for m in PRIMARY_METRICS:
        if m in metrics:
            return m
    return next(iter(metrics), None)


def better(metric: str, a: float, b: float) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


def format_table(exp: dict[str, Any]) -> str:
    """The experiment as a text table: the base model first, then one row per arm; one column per task
    (its primary metric, value ± stderr); the best value per column marked with *."""
    tasks = exp["evaluation"]["tasks"]
    rows: list[tuple[str, dict[str, Any], str]] = []
    if exp.get("base"):
        rows.append((f"base ({exp['base_model']})", exp["base"].get("results") or {}, exp["base"].get("eval_state")))
    for arm in exp["arms"]:
        rows.append((arm["label"], arm.get("results") or {}, arm.get("state")))
    best = exp.get("best") or {}
    top: dict[str, float] = {}  # the best value of each column, the base included
    for _, results, _ in rows:
        for t in tasks:
            metric = (best.get(t) or {}).get("metric")
            m = (results.get(t) or {}).get(metric) if metric else None
            if m and (t not in top or better(metric, m["value"], top[t])):
                top[t] = m["value"]
    header = ["model", *(f"{t} ({(best.get(t) or {}).get('metric') or '?'})" for t in tasks), "pairs", "loss"]
    table = [header]
    for i, (label, results, _state) in enumerate(rows):
        is_base = bool(exp.get("base")) and i == 0
        arm = None if is_base else exp["arms"][i - (1 if exp.get("base") else 0)]
        cells = [label]
        for t in tasks:
            metric = (best.get(t) or {}).get("metric")
            m = (results.get(t) or {}).get(metric) if metric else None
            if not m:
                cells.append("–" if is_base or not arm or not arm.get("error") else "failed")
                continue
            se = f" ± {m['stderr']:.4f}" if m.get("stderr") is not None else ""
            star = "*" if m["value"] == top.get(t) else " "
            cells.append(f"{m['value']:.4f}{se}{star}")
        cells.append("–" if arm is None or arm.get("pairs_trained") is None else str(arm["pairs_trained"]))
        cells.append("–" if arm is None or arm.get("final_loss") is None else f"{arm['final_loss']:.4f}")
        table.append(cells)
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
