"""The one place that calls lm-evaluation-harness: which tasks it knows, and one evaluation with it.

lm-eval is the benchmark engine; this module only builds its arguments and reads its answer
(`grape.evaluations.metrics_of`). Models load with lm-eval's own backends: `hf` (HFLM; a LoRA adapter via
its `peft=` argument) on CPU or one GPU, `vllm` on GPUs (a LoRA adapter via `lora_local_path`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from grape.evaluations import EvalSpec, metrics_of
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
    )
    if out is None:  # lm-eval answers None on ranks other than 0 (multi-process runs)
        raise RuntimeError("lm-eval returned no results (not the main process)")
    return {
        "results": metrics_of(out["results"]),
        "higher_is_better": out.get("higher_is_better") or {},
        "n_samples": out.get("n-samples") or {},
        "versions": versions(backend),
    }
