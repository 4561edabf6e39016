"""The one place that calls lm-evaluation-harness: which tasks it knows, and one evaluation with it.

lm-eval is the benchmark engine; this module only builds its arguments and reads its answer
(`grape.evaluations.metrics_of`). Models load with lm-eval's own backends: `hf` (HFLM; a LoRA adapter via
its `peft=` argument) on CPU or one GPU, `vllm` on GPUs (a LoRA adapter via `lora_local_path`).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from grape.evaluations import EvalSpec, metrics_of
from grape.models import resolve_model

VERSIONED = ("lm_eval", "transformers", "torch", "peft", "trl", "vllm", "datasets")


def task_manager(task_dir: Path | None) -> Any:
    """lm-eval's TaskManager over its own tasks plus the operator's YAML files (lm-eval's include_path)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir) if task_dir else None)


def known_tasks(task_dir: Path | None) -> list[str]:
    """Every task, group and tag name lm-eval can run here (about 15,000 with lm-eval's own)."""
    return list(task_manager(task_dir).all_tasks)


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


def model_args(spec: EvalSpec, *, backend: str, dtype: str, cache_dir: Path | None = None) -> dict[str, Any]:
    """lm-eval's `model_args` of an evaluation (a dict: paths with commas stay intact)."""
    args: dict[str, Any] = {"pretrained": resolve_model(spec.base_model, cache_dir), "dtype": dtype}
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
    spec: EvalSpec, *, task_dir: Path | None, backend: str, device: str, dtype: str, cache_dir: Path | None = None
) -> dict[str, Any]:
    """Run lm-eval once; our record of its answer: results (task -> metric -> value, stderr),
    higher_is_better, n_samples, versions. lm-eval's exceptions propagate: they are the evaluation's reason."""
    import lm_eval

    manager = task_manager(task_dir)
    missing = [t for t in spec.tasks if t not in set(manager.all_tasks)]
    if missing:  # a name this evaluator does not know is refused, never read as a file path by lm-eval
        where = f" or in GRAPE_EVAL_TASK_DIR {task_dir}" if task_dir else " (GRAPE_EVAL_TASK_DIR is not set)"
        raise LookupError(f"task {', '.join(missing)} is not an lm-eval task{where}")
    out = lm_eval.simple_evaluate(
        model=backend,
        model_args=model_args(spec, backend=backend, dtype=dtype, cache_dir=cache_dir),
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
