"""The one place that calls lm-evaluation-harness: which tasks it knows, and one evaluation with it.

lm-eval is the benchmark engine; this module only builds its arguments and reads its answer
(`grape.evaluations.metrics_of`). Models load with lm-eval's own backends: `hf` (HFLM; a LoRA adapter via
its `peft=` argument) on CPU or one GPU, `vllm` on GPUs (a LoRA adapter via `lora_local_path`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grape.evaluations import EvalSpec, metrics_of, task_allowed
from grape.models import resolve_model

VERSIONED = ("lm_eval", "transformers", "torch", "peft", "trl", "vllm", "datasets")


def task_manager(task_dir: Path | None, tasks: list[str] | None = None) -> Any:
    """lm-eval's TaskManager over its own tasks plus the operator's YAML files (lm-eval's include_path).

    With `tasks` that are all plain YAML tasks of the operator's directory, only that directory is indexed:
    the same task configs, without the seconds lm-eval spends indexing its ~15,000 own tasks per process."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    if task_dir and tasks:
        own = TaskManager(include_path=str(task_dir), include_defaults=False)
        if all((e := own.task_index.get(t)) is not None and e.kind is Kind.TASK for t in tasks):
            return own
    return TaskManager(include_path=str(task_dir) if task_dir else None)


def _builtin_tasks(cache_dir: Path | None) -> list[str]:
    """lm-eval's own task names. Indexing its ~15,000 YAML files takes seconds, so the list is kept per
    installed lm-eval (version and the mtime of its tasks folder) under GRAPE_CACHE_DIR."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    version = importlib.metadata.version("lm-eval")
    cache = cache_dir / "eval" / f"lm-eval-{version}-{tasks_dir.stat().st_mtime_ns}-tasks.json" if cache_dir else None
    if cache is not None and cache.exists():
        try:
            return json.loads(cache.read_text())
        except ValueError:
            pass  # a torn write: index again
    names = list(TaskManager().all_tasks)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(names))
        os.replace(tmp, cache)
    return names


def known_tasks(task_dir: Path | None, cache_dir: Path | None = None) -> list[str]:
    """Every task, group and tag name lm-eval can run here: its own (about 15,000) and the operator's."""
    from lm_eval.tasks import TaskManager

    own = TaskManager(include_path=str(task_dir), include_defaults=False).all_tasks if task_dir else []
    return sorted({*_builtin_tasks(cache_dir), *own})


@dataclass
class Offer:
    """What this evaluator runs: the names it offers (allowed, within the subtask cap, no unrequested
    unsafe code), the task names of its GRAPE_EVAL_TASK_DIR, and why allowed names are not offered."""

    offered: list[str]
    local: list[str]
    refused: dict[str, str] = field(default_factory=dict)
    unsafe: frozenset[str] = frozenset()
    """Offered names that run model-generated code (the operator allowed them: GRAPE_EVAL_UNSAFE_CODE_TASKS)."""


def _expand(index: dict[str, Any], name: str, memo: dict[str, tuple[frozenset, frozenset]], depth: int = 0):
    """(leaf tasks, leaf tasks flagged unsafe_code) a name runs: a group its `task` list, a tag its tasks,
    recursively. From the index's parsed YAML (functions unresolved): nothing is imported or downloaded.
    A name missing from the index counts as one task (lm-eval refuses it when run)."""
    from lm_eval.tasks._index import Kind

    if name in memo:
        return memo[name]
    entry = index.get(name)
    if entry is None or depth > 20:  # depth: a cycle of groups is lm-eval's to refuse
        out = (frozenset({name}), frozenset())
    elif entry.kind in (Kind.TASK, Kind.PY_TASK):
        unsafe = bool((entry.cfg or {}).get("unsafe_code"))
        out = (frozenset({name}), frozenset({name}) if unsafe else frozenset())
    else:
        children = entry.tags if entry.kind is Kind.TAG else (entry.cfg or {}).get("task") or []
        leaves: set[str] = set()
        unsafe_leaves: set[str] = set()
        for child in children if isinstance(children, list | set | tuple) else [children]:
            if isinstance(child, dict):  # an inline task (or group) config
                child_name = str(child.get("task") or child.get("group") or "")
                if "group" in child or isinstance(child.get("task"), list) or child_name not in index:
                    leaves.add(f"{name}/{child_name}")
                    if child.get("unsafe_code"):
                        unsafe_leaves.add(f"{name}/{child_name}")
                    continue
                child = child_name
            sub, sub_unsafe = _expand(index, str(child), memo, depth + 1)
            leaves |= sub
            unsafe_leaves |= sub_unsafe
        out = (frozenset(leaves), frozenset(unsafe_leaves))
    memo[name] = out
    return out


def offer(
    task_dir: Path | None,
    *,
    patterns: list[str],
    unsafe_patterns: list[str],
    max_subtasks: int,
    cache_dir: Path | None = None,
) -> Offer:
    """The tasks this evaluator offers, under the operator's GRAPE_EVAL_TASKS (`patterns`; empty: only the
    tasks of `task_dir`), GRAPE_MAX_EVAL_SUBTASKS and GRAPE_EVAL_UNSAFE_CODE_TASKS. lm-eval's own ~15,000
    are indexed only when a pattern may name them."""
    from lm_eval.tasks import TaskManager

    local_manager = TaskManager(include_path=str(task_dir), include_defaults=False) if task_dir else None
    local = sorted(local_manager.all_tasks) if local_manager else []
    if patterns:
        names = [n for n in known_tasks(task_dir, cache_dir) if task_allowed(n, patterns, set(local))]
    else:
        names = local
    index = local_manager.task_index if local_manager else {}
    memo: dict[str, tuple[frozenset, frozenset]] = {}
    if (
        patterns
        and any(n not in index for n in names)
        or any(leaf not in index for n in names for leaf in _expand(index, n, memo)[0])
    ):  # lm-eval's own tasks are named, or a local group includes some: the full index decides
        index = TaskManager(include_path=str(task_dir) if task_dir else None).task_index
        memo = {}
    offered, refused, unsafe = [], {}, set()
    for name in names:
        leaves, unsafe_leaves = _expand(index, name, memo)
        if len(leaves) > max_subtasks:
            refused[name] = f"runs {len(leaves)} tasks, more than the operator's GRAPE_MAX_EVAL_SUBTASKS={max_subtasks}"
        elif unsafe_leaves and not task_allowed(name, unsafe_patterns, set()):
            refused[name] = (
                f"runs model-generated code ({', '.join(sorted(unsafe_leaves)[:3])}: lm-eval's unsafe_code), which "
                "the operator has not allowed (GRAPE_EVAL_UNSAFE_CODE_TASKS)"
            )
        else:
            offered.append(name)
            if unsafe_leaves:
                unsafe.add(name)
    return Offer(offered=offered, local=local, refused=refused, unsafe=frozenset(unsafe))


def versions(backend: str) -> dict[str, str]:
    out = {}
    for dist in VERSIONED:
        if dist == "vllm" and backend != "vllm":
            continue
        try:
            out[dist] = importlib.metadata.version(dist.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_args(
    spec: EvalSpec, *, backend: str, dtype: str, cache_dir: Path | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """lm-eval's `model_args` of an evaluation (a dict: paths with commas stay intact). A model's own Python
    code runs only when the operator trusts it (GRAPE_TRUST_REMOTE_CODE_MODELS); lm-eval's default is off."""
    args: dict[str, Any] = {"pretrained": resolve_model(spec.base_model, cache_dir), "dtype": dtype}
    if trust_remote_code:
        args["trust_remote_code"] = True
    if spec.adapter:
        adapter = Path(spec.adapter)
        if not (adapter / "adapter_config.json").exists():
            raise FileNotFoundError(
                f"LoRA adapter {adapter} of training job {spec.training_job} is not on this evaluator "
                "(evaluators read the trainers' GRAPE_TRAIN_DIR: share it, or run the evaluator beside them)"
            )
        if backend == "vllm":
            rank = json.loads((adapter / "adapter_config.json").read_text()).get("r", 16)
            args.update(lora_local_path=str(adapter), max_lora_rank=int(rank))
        else:
            args["peft"] = str(adapter)
    return args


def evaluate(
    spec: EvalSpec,
    *,
    task_dir: Path | None,
    backend: str,
    device: str,
    dtype: str,
    cache_dir: Path | None = None,
    trust_remote_code: bool = False,
    confirm_run_unsafe_code: bool = False,
) -> dict[str, Any]:
    """Run lm-eval once; our record of its answer: results (task -> metric -> value, stderr),
    higher_is_better, n_samples, versions. lm-eval's exceptions propagate: they are the evaluation's reason."""
    import lm_eval

    manager = task_manager(task_dir, list(spec.tasks))
    missing = [t for t in spec.tasks if t not in set(manager.all_tasks)]
    if missing:  # a name this evaluator does not know is refused, never read as a file path by lm-eval
        where = f" or in GRAPE_EVAL_TASK_DIR {task_dir}" if task_dir else " (GRAPE_EVAL_TASK_DIR is not set)"
        raise LookupError(f"task {', '.join(missing)} is not an lm-eval task{where}")
    out = lm_eval.simple_evaluate(
        model=backend,
        model_args=model_args(
            spec, backend=backend, dtype=dtype, cache_dir=cache_dir, trust_remote_code=trust_remote_code
        ),
        tasks=list(spec.tasks),
        num_fewshot=spec.num_fewshot,
        batch_size=spec.batch_size,
        device=_device(device) if backend == "hf" else None,
        limit=spec.limit,
        task_manager=manager,
        log_samples=False,
        # lm-eval refuses a task flagged unsafe_code without it: set only by the operator's evaluator
        confirm_run_unsafe_code=confirm_run_unsafe_code,
    )
    if out is None:  # lm-eval answers None on ranks other than 0 (multi-process runs)
        raise RuntimeError("lm-eval returned no results (not the main process)")
    return {
        "results": metrics_of(out["results"]),
        "higher_is_better": out.get("higher_is_better") or {},
        "n_samples": out.get("n-samples") or {},
        "versions": versions(backend),
    }
