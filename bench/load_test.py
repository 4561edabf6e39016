"""Load test: N concurrent clients upload the real pool x10 while a worker scores; nothing may be lost.

    python bench/load_test.py --clients 8 --repeat 10

Prints accepted items/s and pairs/s, the latency of the status endpoint under load (p50/p99), and the
check that every accepted item is stored and either scored, failed or still queued.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import redis

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT.parent / "shared" / "data" / "alpaca_eval_pool_dev.jsonl"
MODEL = "smollm2-135m"


def synth_pool(repeat: int) -> list[dict]:
    base = [orjson.loads(line) for line in POOL.read_bytes().splitlines() if line.strip()]
    return [{**row, "id": f"{row['id']}-r{r}"} for r in range(repeat) for row in base]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=10, help="the pool is repeated this many times with new ids")
    ap.add_argument("--batch", type=int, default=100, help="items per upload request")
    ap.add_argument("--no-worker", action="store_true", help="do not run a scoring worker during the upload")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from grape.keys import Keys
    from grape.redis_server import EmbeddedRedis, free_port

    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        server = EmbeddedRedis().start()
        url = server.url
    keys = Keys(f"grape-load-{uuid.uuid4().hex[:6]}")
    env = {**os.environ, "REDIS_URL": url, "GRAPE_KEY_PREFIX": keys.prefix, "GRAPE_MAX_QUEUE_CHUNKS": "100000"}
    port = free_port()
    gw = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT
    )
    worker = None
    if not args.no_worker:
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers", "--model", MODEL, "--commit-tokens", "2048"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        if worker:  # let the worker load its model, so that it scores while the clients upload
            r0 = redis.Redis.from_url(url)
            for _ in range(600):
                if r0.zcard(keys.workers()):
                    break
                time.sleep(0.2)
        items = synth_pool(args.repeat)
        pairs = sum(len(i["candidates"]) for i in items)
        ds = httpx.post(f"{base}/v1/datasets", json={"name": "load", "target_model": MODEL}).json()["id"]
        batches = [items[i : i + args.batch] for i in range(0, len(items), args.batch)]

        latencies: list[float] = []
        done = threading.Event()

        def poll_status() -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                while not done.is_set():
                    t = time.perf_counter()
                    c.get(f"/v1/datasets/{ds}").raise_for_status()
                    latencies.append(time.perf_counter() - t)
                    time.sleep(0.05)

        accepted = 0
        lock = threading.Lock()

        def upload(batch: list[dict]) -> None:
            nonlocal accepted
            body = b"".join(orjson.dumps(i) + b"\n" for i in batch)
            with httpx.Client(base_url=base, timeout=120) as c:
                r = c.post(f"/v1/datasets/{ds}/items", content=body, headers={"Content-Type": "application/x-ndjson"})
                r.raise_for_status()
                with lock:
                    accepted += r.json()["accepted"]

        poller = threading.Thread(target=poll_status, daemon=True)
        poller.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(upload, batches))
        elapsed = time.perf_counter() - t0
        done.set()
        poller.join()
        if worker:
            worker.terminate()  # SIGTERM: finishes its slice and hands back the rest
            worker.wait(timeout=120)

        r = redis.Redis.from_url(url)
        st = httpx.get(f"{base}/v1/datasets/{ds}").json()
        stored = r.hlen(keys.items(ds))
        scored = {k.decode() for k in r.hkeys(keys.scores(ds))}
        failed = {k.decode() for k in r.hkeys(keys.failed(ds))}
        queued = {i for _, f in r.xrange(keys.stream(MODEL)) for i in orjson.loads(f[b"items"])}
        # and the chunks waiting for their turn in the dataset's backlog (fair share)
        queued |= {i for chunk in r.lrange(keys.backlog(ds, "logprob"), 0, -1) for i in orjson.loads(chunk)}
        try:
            pending = r.xpending(keys.stream(MODEL), "scorers")["pending"]
        except redis.ResponseError:  # no consumer group: no worker ever read
            pending = 0
        all_ids = {i["id"] for i in items}
        lost = all_ids - scored - failed - queued

        lat = sorted(latencies)
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
        print(f"items uploaded     {len(items)} ({pairs} pairs) by {args.clients} clients in {len(batches)} requests")
        print(f"upload time        {elapsed:.1f} s")
        rate = f"{accepted / elapsed:.0f} items/s, {pairs / elapsed:.0f} pairs/s"
        print(f"accepted           {accepted} items/{len(items)}; {rate}")
        ms = f"p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {lat[-1] * 1000:.1f} ms"
        print(f"status latency     {ms} ({len(lat)} calls)")
        print(
            f"stored in Redis    {stored} items; scored {len(scored)}, failed {len(failed)}, still queued {len(queued)}"
        )
        print(f"pending on workers {pending}")
        print(f"status counters    items {st['items']}, scored {st['scored_items']}, failed {st['failed_items']}")
        print(f"lost               {len(lost)}")
        ok = not lost and stored == len(items) == accepted and st["items"] == len(items) and pending == 0
        print("RESULT", "ok: nothing lost" if ok else "FAILED")
        stale = list(r.scan_iter(match=f"{keys.prefix}:*", count=1000))
        if stale:
            r.delete(*stale)
        return 0 if ok else 1
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        if worker and worker.poll() is None:
            worker.kill()
        if server:
            server.close()


if __name__ == "__main__":
    sys.exit(main())
