"""An experiment on the real pool: one SmolLM2 LoRA per selection strategy, on an equal budget, each evaluated.

    python bench/experiment.py                      # 40 items, 32 pairs per arm, the offline task in bench/
    python bench/experiment.py --items 100 --pairs 64 --max-steps 16

Starts everything in its own processes on Redis (REDIS_URL, else a private server): a gateway
(`python -m service`), a scoring worker (`python -m workers`), a `grape trainer` and a `grape evaluator`
(GRAPE_EVAL_TASK_DIR=bench/eval_tasks). Uploads the first `--items` instructions of
../shared/data/alpaca_eval_pool_dev.jsonl (responses cut to `--max-chars` so CPU scoring stays short), scores
them with the target model, stops the worker, then runs `POST /v1/experiments` with one arm per strategy that
needs no extra score kind and one of source:gpt4_1106_preview, and prints the table `grape experiment --wait`
prints.

On a 2-core CPU this is a check of the machinery, not a result: see the README's "Experiments" section for
what a 135M model on a CPU can and cannot show, and for the same run on GPUs with real lm-eval tasks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POOL = ROOT.parent / "shared" / "data" / "alpaca_eval_pool_dev.jsonl"
SOURCE = "gpt4_1106_preview"
"""The teacher of the source:<name> arm."""


def default_arms() -> str:
    """The strategies any dataset can run (no extra score kinds), and source:SOURCE."""
    from grape.cli_options import plain_strategies

    return ",".join([*plain_strategies(), f"source:{SOURCE}"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", default=str(POOL))
    p.add_argument("--items", type=int, default=40, help="instructions of the pool to score (CPU: keep it small)")
    p.add_argument("--max-chars", type=int, default=600, help="responses cut to this many characters")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--arms", default=default_arms())
    p.add_argument("--pairs", type=int, default=32, help="pairs every arm trains on")
    p.add_argument("--max-steps", type=int, default=8, help="LoRA optimizer steps per arm")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--tasks", default="grape_bench_mc", help="lm-eval tasks (offline: those in --task-dir)")
    p.add_argument("--task-dir", default=str(ROOT / "bench" / "eval_tasks"))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None, help="work directory (logs, adapters); default a temporary one")
    args = p.parse_args()

    import orjson
    import redis

    from grape.client import GrapeClient
    from grape.experiment_cli import watch_experiment
    from grape.experiments import format_table
    from grape.keys import Keys
    from grape.progress import watch_scoring
    from grape.redis_server import EmbeddedRedis, free_port

    out = Path(args.out or f"/tmp/grape-experiment-{uuid.uuid4().hex[:6]}")
    out.mkdir(parents=True, exist_ok=True)
    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        server = EmbeddedRedis().start()
        url = server.url
    keys = Keys(f"grape-bench-exp-{uuid.uuid4().hex[:6]}")
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": url,
        "GRAPE_KEY_PREFIX": keys.prefix,
        "GRAPE_TRAIN_DIR": str(out / "train"),
        "GRAPE_EVAL_TASK_DIR": args.task_dir,
        "GRAPE_EVAL_DEVICE": "cpu",
        "GRAPE_EXPERIMENT_POLL_S": "1",
        "GRAPE_CHUNK_PAIRS": "64",  # progress shows as scoring goes (the defaults suit big pools)
        "GRAPE_COMMIT_TOKENS": "4096",
    }
    procs: dict[str, subprocess.Popen] = {}

    def spawn(name: str, *cmd: str) -> None:
        with open(out / f"{name}.log", "ab") as log:
            procs[name] = subprocess.Popen([sys.executable, *cmd], env=env, stdout=log, stderr=subprocess.STDOUT)

    t0 = time.monotonic()
    try:
        spawn("evaluator", "-m", "grape.cli", "evaluator")
        spawn("gateway", "-m", "service", "--port", str(port), "--log-level", "warning")
        spawn("worker", "-m", "workers", "--model", args.model, "--backend", "hf")
        base = f"http://127.0.0.1:{port}"
        client = GrapeClient(base)
        for _ in range(300):
            try:
                client.health()
                break
            except Exception:  # noqa: BLE001 - the gateway is starting
                time.sleep(0.2)
        items = []
        with open(args.pool, "rb") as f:
            for line in f:
                if len(items) == args.items:
                    break
                row = orjson.loads(line)
                cut = args.max_chars
                cands = [{"source": c["source"], "response": c["response"][:cut]} for c in row["candidates"]]
                items.append({"id": row["id"], "instruction": row["instruction"], "candidates": cands})
        ds = client.create_dataset("experiment bench", args.model)["id"]
        client.upload(ds, items)
        print(f"dataset {ds}: {len(items)} instructions x {len(items[0]['candidates'])} candidates", file=sys.stderr)
        watch_scoring(client, ds)
        t_scored = time.monotonic()
        procs.pop("worker").terminate()  # its cores go to training and evaluation
        r = redis.Redis.from_url(url)
        while not r.scard(keys.eval_tasks()):
            if procs["evaluator"].poll() is not None:
                raise RuntimeError((out / "evaluator.log").read_text()[-3000:])
            time.sleep(1)
        spawn("trainer", "-m", "grape.cli", "trainer", "--launcher", "inline")
        body = {
            "dataset_id": ds,
            "arms": [{"strategy": a} for a in args.arms.split(",")],
            "budget": {"pairs": args.pairs},
            "hyperparameters": {
                "max_steps": args.max_steps,
                "learning_rate": args.lr,
                "per_device_train_batch_size": args.batch_size,
                "max_length": args.max_length,
                "gradient_checkpointing": False,
                "bf16": False,
            },
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0},
            "evaluation": {"tasks": args.tasks.split(","), "limit": args.limit},
            "include_base": True,
        }
        exp_id = client.create_experiment(body)["id"]
        exp = watch_experiment(client, exp_id, interval=2.0)
        t_done = time.monotonic()
        print(f"experiment {exp_id}: {exp['state']}")
        print(
            f"pool: first {len(items)} instructions of {Path(args.pool).name} (responses cut to {args.max_chars} "
            f"characters), {len(items[0]['candidates'])} candidates each; target/base model {args.model}"
        )
        print(
            f"budget: {args.pairs} pairs per arm ({exp['instructions']} instructions every per-instruction arm "
            f"could serve); LoRA r={args.lora_r}, {args.max_steps} steps x batch {args.batch_size}, lr {args.lr}"
        )
        print(f"evaluation: {', '.join(args.tasks.split(','))} (lm-eval, hf backend, CPU)\n")
        print(format_table(exp))
        print()
        for arm in exp["arms"]:
            sel = client.experiment_selection(exp_id, arm["index"])
            sources = Counter(rec["source"] for rec in sel).most_common(3)
            chars = sum(len(rec["messages"][-1]["content"]) for rec in sel) / max(1, len(sel))
            top = ", ".join(f"{s} {n}" for s, n in sources)
            print(f"{arm['label']:<28} {len(sel)} pairs, mean response {chars:.0f} chars; sources: {top}")
            if arm.get("error"):
                print(f"  error: {arm['error']}")
        print("\nversions: " + ", ".join(f"{k} {v}" for k, v in sorted(exp["versions"].items())))
        print(f"time: scoring {t_scored - t0:.0f} s, experiment {t_done - t_scored:.0f} s (2 CPU cores)")
        return 0 if exp["state"] == "succeeded" else 1
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
