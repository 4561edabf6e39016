"""`python -m evaluator.run SPEC OUT`: one evaluation in a process of its own, started by `grape evaluator`.

A process per evaluation so that cancel and shutdown can stop lm-eval at any point (kill the process), and
a model's memory goes with it. It reads the EvalSpec JSON in SPEC and writes OUT: the record of lm-eval's
answer, or {"error": ...} with lm-eval's reason (exit code 1). It runs in GRAPE_EVAL_TASK_DIR, so the
relative `data_files` of the operator's task YAML files are relative to that directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

import orjson

from grape import lifeline
from grape.settings import Settings


def main(argv: list[str] | None = None) -> int:
    # Linux: killed when the evaluator that started us dies (even by SIGKILL), so a dead evaluator leaves no
    # orphan burning the CPU its successor needs; lm-eval's own processes (vLLM's engine) follow us in turn
    lifeline.hold_on()
    lifeline.guard_children()
    p = argparse.ArgumentParser(prog="python -m evaluator.run")
    p.add_argument("spec", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--backend", default="hf", choices=Settings.choices("eval_backend"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--task-dir", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--trust-remote-code", action="store_true", help="the operator trusts this model's own code")
    p.add_argument(
        "--confirm-run-unsafe-code",
        action="store_true",
        help="the operator allowed these tasks to run model-generated code (GRAPE_EVAL_UNSAFE_CODE_TASKS)",
    )
    args = p.parse_args(argv)
    # lm-eval's own log lines (tasks built, requests run, warnings) become the evaluation's log stream
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from evaluator.harness import evaluate
    from grape.evaluations import EvalSpec

    spec = EvalSpec.model_validate_json(args.spec.read_bytes())
    try:
        record = evaluate(
            spec,
            task_dir=args.task_dir,
            backend=args.backend,
            device=args.device,
            dtype=args.dtype,
            cache_dir=args.cache_dir,
            trust_remote_code=args.trust_remote_code,
            confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        )
    except Exception as exc:  # noqa: BLE001 - lm-eval's reason, whatever it is, is the evaluation's error
        traceback.print_exc()
        args.out.write_bytes(orjson.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    args.out.write_bytes(orjson.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
