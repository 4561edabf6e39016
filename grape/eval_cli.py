"""`grape eval MODEL_OR_JOB --tasks T1,T2`: evaluate a model with lm-eval over HTTP, and print the metrics."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from grape.store.jobqueue import TERMINAL


def eval_body(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/evaluations body of the command's arguments (unset options keep the API defaults)."""
    body: dict[str, Any] = {"model": args.model, "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()]}
    for name in ("limit", "num_fewshot"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.batch_size is not None:
        body["batch_size"] = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    return body


def format_results(ev: dict[str, Any]) -> str:
    """task | metric | value | stderr, one row per metric, as lm-eval reported them."""
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in (ev.get("results") or {}).items():
        for metric, v in metrics.items():
            stderr = "" if v.get("stderr") is None else f"{v['stderr']:.4f}"
            rows.append((task, metric, f"{v['value']:.4f}", stderr))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for n, r in enumerate(rows):
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def wait_evaluation(client: Any, eval_id: str, *, interval: float = 1.0) -> dict[str, Any]:
    """Poll until the evaluation ends, showing its state and lm-eval's request progress on one line."""
    shown = ""
    while True:
        ev = client.evaluation(eval_id)
        line = f"{eval_id}: {ev['state']}"
        if ev["state"] == "running" and ev.get("total_requests"):
            line += f" ({ev['done_requests']}/{ev['total_requests']} requests)"
        if line != shown:
            print(f"\r{line}\x1b[K", end="", file=sys.stderr, flush=True)
            shown = line
        if ev["state"] in TERMINAL:
            print(file=sys.stderr)
            return ev
        time.sleep(interval)


def cmd_eval(args: argparse.Namespace) -> int:
    from grape.client import GrapeClient

    with GrapeClient(args.url, api_key=os.environ.get("GRAPE_API_KEY")) as client:
        created = client.create_evaluation(eval_body(args))
        print(f"evaluation {created['id']} queued", file=sys.stderr)
        if not args.wait:
            print(created["id"])
            return 0
        try:
            ev = wait_evaluation(client, created["id"], interval=args.interval)
        except KeyboardInterrupt:
            print(f"\nstopped watching; evaluation {created['id']} goes on", file=sys.stderr)
            return 130
    if ev["state"] == "succeeded":
        print(f"{ev['model']}" + (f" (limit {ev['limit']})" if ev.get("limit") else ""))
        print(format_results(ev))
        return 0
    print(f"evaluation {ev['id']} {ev['state']}: {ev.get('error') or ''}".rstrip(": "), file=sys.stderr)
    return 1


def add_eval_parser(sub: Any, *, default_url: str) -> argparse.ArgumentParser:
    e = sub.add_parser(
        "eval",
        help="evaluate a model (or a training job's result) with lm-evaluation-harness",
        description="Create an evaluation (POST /v1/evaluations); a `grape evaluator` runs it with lm-eval.",
    )
    e.add_argument("model", help="a model name (smollm2-135m, a path, a hub id) or a succeeded training job id")
    e.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    e.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    e.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    e.add_argument("--batch-size", default=None, help='requests per batch, or "auto" (default 8)')
    e.add_argument("--wait", action="store_true", help="follow it and print the metrics table")
    e.add_argument("--interval", type=float, default=1.0, help="seconds between status polls")
    e.add_argument("--url", default=default_url, help="gateway URL (env GRAPE_URL)")
    e.set_defaults(func=cmd_eval)
    return e
