"""`grape demo`: the whole path on one machine.

Redis (REDIS_URL if set, else a private server), a gateway and one scoring worker as separate processes,
the pool sent over HTTP, a progress bar, and the selection with per-source win counts.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

from grape.client import GrapeClient
from grape.console import print_wins
from grape.pools import read_pool
from grape.progress import watch_scoring
from grape.redis_server import EmbeddedRedis, free_port
from grape.settings import get_settings

EXAMPLE_POOL = Path(__file__).resolve().parent.parent / "examples" / "pool.jsonl"


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_demo(args: argparse.Namespace) -> int:
    pool = Path(args.pool) if args.pool else EXAMPLE_POOL
    if not pool.exists():
        print(f"grape demo: pool not found: {pool}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = get_settings()
    redis_server = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if settings.redis_url:
            redis_url = settings.redis_url
            print(f"using Redis at {redis_url}")
        else:
            redis_server = EmbeddedRedis(out / "redis").start()
            redis_url = redis_server.url
            print(f"started a private Redis at {redis_url} (set REDIS_URL to use yours)")
        port = free_port()
        env = {**os.environ, "REDIS_URL": redis_url, "GRAPE_PORT": str(port), "GRAPE_DTYPE": args.dtype}
        gw_log, wk_log = out / "gateway.log", out / "worker.log"
        commands = {
            gw_log: [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
            # small commits so the bar moves on a CPU; on a GPU the default is right
            wk_log: [sys.executable, "-m", "workers", "--model", args.model, "--dtype", args.dtype,
                     "--commit-tokens", "4096"],
        }  # fmt: skip
        for log_path, cmd in commands.items():
            with open(log_path, "wb") as log_file:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT))
        print(f"gateway on http://127.0.0.1:{port} (status page at /, API docs at /docs), one worker on {args.model}")
        print(f"logs: {gw_log}, {wk_log}")

        def check() -> None:
            for p, log in zip(procs, (gw_log, wk_log), strict=True):
                if p.poll() is not None:
                    raise RuntimeError(f"{log.stem} exited with code {p.returncode}:\n{_tail(log)}")

        client = GrapeClient(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            check()
            try:
                client.health()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        items = list(itertools.islice(read_pool(pool), args.limit))
        ds = client.create_dataset(f"demo:{pool.stem}", args.model)
        res = client.upload_all(ds["id"], items)
        print(
            f"dataset {ds['id']}: {res['accepted']} instructions, "
            f"{sum(len(i.get('candidates', [])) for i in items)} candidates sent from {pool}"
            + (f", {res.get('rejected_total', len(res['rejected']))} rejected" if res["rejected"] else "")
        )
        print("the worker loads the model first (the bundled one is converted once, ~20 s)")
        st = watch_scoring(client, ds["id"], check=check)
        path = out / "selection.jsonl"
        n = client.export(ds["id"], path)
        print(
            f"scored {st['scored_candidates']} pairs ({st['tokens_scored']} tokens), {st['failed_items']} items failed"
        )
        print_wins(path)
        print(f"\nselected set ({n} records, TRL SFT messages format): {path.resolve()}")
        return 0
    except RuntimeError as exc:
        print(f"grape demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if redis_server:
            redis_server.close()
