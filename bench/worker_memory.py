"""Peak memory of a scoring worker: bounded by the token budget, not by the pool size.

    python bench/worker_memory.py --items 100 1000 --max-response-chars 80

For each size, a pool synthesized from the real one (instructions repeated with new ids, responses cut
short so the 10x pool scores in minutes on a CPU) is uploaded to a private Redis, a real worker process
scores all of it, and its peak resident memory (ru_maxrss of the child) is printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT.parent / "shared" / "data" / "alpaca_eval_pool_dev.jsonl"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--max-response-chars", type=int, default=80)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from fastapi.testclient import TestClient

    from grape.keys import Keys
    from grape.redis_server import EmbeddedRedis
    from grape.settings import Settings
    from service.app import create_app

    base = [orjson.loads(x) for x in POOL.read_bytes().splitlines() if x.strip()]
    print(f"{'items':>6} {'pairs':>7} {'pair-tokens':>12} {'seconds':>8} {'peak RSS MiB':>13}")
    for n in args.items:
        with EmbeddedRedis() as server:
            keys = Keys("mem")
            settings = Settings(redis_url=server.url, key_prefix=keys.prefix)
            items = []
            for i in range(n):
                row = base[i % len(base)]
                cands = [
                    {"source": c["source"], "response": c["response"][: args.max_response_chars]}
                    for c in row["candidates"]
                ]
                items.append({"id": f"m{i}", "instruction": row["instruction"], "candidates": cands})
            with TestClient(create_app(settings)) as api:
                ds = api.post("/v1/datasets", json={"name": "mem", "target_model": "smollm2-135m"}).json()["id"]
                for s in range(0, n, 500):
                    api.post(f"/v1/datasets/{ds}/items", json={"items": items[s : s + 500]}).raise_for_status()
                env = {**os.environ, "REDIS_URL": server.url, "GRAPE_KEY_PREFIX": keys.prefix}
                code = (
                    "import resource, sys; from workers.main import main; main(sys.argv[1:]); "
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
                )
                t = time.perf_counter()
                out = subprocess.run(
                    [sys.executable, "-c", code, "--model", "smollm2-135m", "--idle-exit", "3",
                     "--batch-tokens", str(args.batch_tokens)],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True, text=True,
                )  # fmt: skip
                secs = time.perf_counter() - t
                peak = int(out.stdout.strip().splitlines()[-1])  # KiB, this worker process alone
                st = api.get(f"/v1/datasets/{ds}").json()
                assert st["state"] == "done", st
                print(
                    f"{n:>6} {st['scored_candidates']:>7} {st['tokens_scored']:>12} {secs:>8.0f} {peak / 1024:>13.0f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
