"""`grape evaluator`: one evaluator process. It publishes the lm-eval tasks it can run, then takes evaluations
from Redis one at a time and runs each with lm-evaluation-harness in a child process."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from evaluator.loop import EvaluatorLoop
from grape.keys import Keys
from grape.redis_client import connect
from grape.settings import DEFAULT_REDIS_URL, Settings, get_settings


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grape evaluator", description="Run queued evaluations with lm-evaluation-harness."
    )
    p.add_argument(
        "--task-dir",
        default=None,
        help=f"a directory of lm-eval task YAML files (GRAPE_EVAL_TASK_DIR; {settings.eval_task_dir or 'unset'})",
    )
    p.add_argument(
        "--backend",
        choices=Settings.choices("eval_backend"),
        default=None,
        help=f"lm-eval model backend (GRAPE_EVAL_BACKEND; {settings.eval_backend}): hf on CPU or one GPU, vllm on GPUs",
    )
    p.add_argument("--device", default=None, help=f"hf backend device (GRAPE_EVAL_DEVICE; {settings.eval_device})")
    p.add_argument("--name", default=None, help="evaluator name (default host-pid)")
    p.add_argument("--max-evals", type=int, default=None, help="exit after this many evaluations")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    args = build_parser(settings).parse_args(argv)
    update = {"eval_task_dir": Path(args.task_dir) if args.task_dir else None, "eval_backend": args.backend}
    update["eval_device"] = args.device
    settings = settings.model_copy(update={k: v for k, v in update.items() if v is not None})
    if settings.eval_task_dir is not None and not settings.eval_task_dir.is_dir():
        raise SystemExit(f"grape evaluator: GRAPE_EVAL_TASK_DIR {settings.eval_task_dir} is not a directory")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = EvaluatorLoop(
        connect(settings.redis_url or DEFAULT_REDIS_URL), Keys(settings.key_prefix), settings, name=args.name
    )
    loop.install_signal_handlers()
    loop.run(max_evals=args.max_evals, idle_exit_s=args.idle_exit)
    return 0
