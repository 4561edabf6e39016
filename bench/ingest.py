"""Ingest throughput and Redis bytes per pair: C concurrent clients post NDJSON batches to a real gateway.

    REDIS_URL=redis://127.0.0.1:6379/0 python bench/ingest.py --clients 4 --batch 300 --repeat 40 --workers 2

The dev pool (../shared/data, 403 items x 8 candidates) is repeated with new ids; the request bodies are built
before the clock starts, so the figure is the gateway's (parse, validate, compress, the ingest script) and
Redis's. Then every item gets a result as a worker writes it (per candidate logprob_sum, tokens, prompt_tokens,
written by the results script), and the dataset's keys are measured with MEMORY USAGE: bytes per stored pair,
per key, and Redis's used_memory growth. Prints the load average too: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import random
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


def fake_scores(item: dict, rng: random.Random) -> list[dict]:
    """Scores shaped as a real worker's (a float sum of logprobs, token counts)."""
    out = []
    for c in item["candidates"]:
        tokens = max(1, len(c["response"]) // 4)
        out.append({"logprob_sum": -tokens * rng.uniform(0.3, 2.5), "tokens": tokens, "prompt_tokens": 40})
    return out


def gateway_cpu(pid: int) -> float:
    """CPU seconds used by the gateway process and its children (uvicorn workers)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        t = p.cpu_times()
        total += t.user + t.system
    return total


def process_split(pid: int) -> list[float]:
    """CPU seconds of each gateway process that serves (with --workers N, the children; else the gateway)."""
    import psutil

    proc = psutil.Process(pid)
    kids = [p for p in proc.children() if "spawn_main" in " ".join(p.cmdline())]
    return [sum(p.cpu_times()[:2]) for p in kids or [proc]]


def redis_cpu(r: redis.Redis) -> float:
    """CPU seconds of the Redis server (all its clients: the machine may be shared, so a lower bound is not given)."""
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=300, help="items per upload request")
    ap.add_argument("--repeat", type=int, default=20, help="the pool is repeated this many times with new ids")
    ap.add_argument("--workers", type=int, default=1, help="gateway processes (grape serve --workers)")
    ap.add_argument("--compression", type=int, default=None, help="GRAPE_ITEM_COMPRESSION (default: the setting's)")
    ap.add_argument("--no-scores", action="store_true", help="measure the items only")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from grape.keys import Keys
    from grape.redis_server import free_port
    from grape.store import scoring
    from grape.store.io import call

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    keys = Keys(f"grape-ingest-{uuid.uuid4().hex[:6]}")
    env = {
        **os.environ,
        "REDIS_URL": url,
        "GRAPE_KEY_PREFIX": keys.prefix,
        "GRAPE_MAX_QUEUE_CHUNKS": "1000000",
        "GRAPE_MAX_CONCURRENT_UPLOADS": str(max(4, args.clients)),
    }
    if args.compression is not None:
        env["GRAPE_ITEM_COMPRESSION"] = str(args.compression)
    port = free_port()
    cmd = [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"]
    cmd += ["--workers", str(args.workers)]
    gw = subprocess.Popen(cmd, env=env, cwd=ROOT)
    r = redis.Redis.from_url(url)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.get(f"{base}/healthz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        items = synth_pool(args.repeat)
        pairs = sum(len(i["candidates"]) for i in items)
        ds = httpx.post(f"{base}/v1/datasets", json={"name": "ingest", "target_model": MODEL}).json()["id"]
        bodies = [
            b"".join(orjson.dumps(i) + b"\n" for i in items[k : k + args.batch])
            for k in range(0, len(items), args.batch)
        ]
        mem0 = r.info("memory")["used_memory"]
        load0 = os.getloadavg()
        gw_cpu0, redis_cpu0, client_cpu0 = gateway_cpu(gw.pid), redis_cpu(r), time.process_time()
        split0 = process_split(gw.pid)

        # one connection per client, kept: a new httpx.Client per request costs ~20 ms of CPU (its TLS context),
        # as much as the gateway spends on the request
        local = threading.local()
        opened: list[httpx.Client] = []

        def upload(body: bytes) -> int:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=base, timeout=300)
                opened.append(local.client)
            ndjson = {"Content-Type": "application/x-ndjson"}
            resp = local.client.post(f"/v1/datasets/{ds}/items", content=body, headers=ndjson)
            resp.raise_for_status()
            return int(resp.json()["accepted"])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            accepted = sum(pool.map(upload, bodies))
        elapsed = time.perf_counter() - t0
        for c in opened:
            c.close()
        load1 = os.getloadavg()
        gw_cpu, rd_cpu = gateway_cpu(gw.pid) - gw_cpu0, redis_cpu(r) - redis_cpu0
        client_cpu = time.process_time() - client_cpu0
        split = [round(b - a, 1) for a, b in zip(split0, process_split(gw.pid), strict=True)]
        assert accepted == len(items), (accepted, len(items))
        print(f"ingest     {len(items)} items, {pairs} pairs, {len(bodies)} requests of {args.batch} items")
        print(f"           {args.clients} clients, gateway --workers {args.workers}: {elapsed:.2f} s")
        print(f"           {pairs / elapsed:,.0f} pairs/s ({len(items) / elapsed:,.0f} items/s)")
        per_pair = (gw_cpu + rd_cpu + client_cpu) / pairs
        print(
            f"cpu        gateway {gw_cpu / pairs * 1e6:.1f} us/pair, redis {rd_cpu / pairs * 1e6:.1f} us/pair, "
            f"the {args.clients} clients {client_cpu / pairs * 1e6:.1f} us/pair: {os.cpu_count()} idle cores would "
            f"ingest ~{(os.cpu_count() or 1) / per_pair:,.0f} pairs/s"
        )
        if len(split) > 1:
            print(f"           CPU seconds of each gateway process: {split} (the kernel hands each connection to one)")
        print(f"load avg   before {load0[0]:.2f}, after {load1[0]:.2f} (1 min), {os.cpu_count()} cores")

        # the stream and backlogs drain as workers ack: read them empty, as a finished dataset leaves them
        q = keys.score_queue("logprob", MODEL)
        r.delete(q.stream, keys.backlog(ds, "logprob"), q.ring, q.waiting)
        if not args.no_scores:
            rng = random.Random(0)
            for k in range(0, len(items), 200):
                rows = [
                    scoring.ItemResult(it["id"], len(it["candidates"]), scores=fake_scores(it, rng))
                    for it in items[k : k + 200]
                ]
                call(r, scoring.results(keys, "logprob", MODEL, ds, "", time.time(), rows))
        mem1 = r.info("memory")["used_memory"]
        per_key = {
            name: r.memory_usage(key, samples=0) or 0
            for name, key in (
                ("items", keys.items(ds)),
                ("scores", keys.scores(ds)),
                ("order", keys.order(ds)),
                ("stats", keys.stats(ds)),
                ("metadata", keys.dataset(ds)),
            )
        }
        total = sum(per_key.values())
        print(f"redis      {total / pairs:.0f} bytes per pair (MEMORY USAGE of the dataset's keys)")
        for name, n in per_key.items():
            print(f"           {name:9s} {n / pairs:8.1f} bytes per pair")
        print(f"           used_memory grew {(mem1 - mem0) / pairs:.0f} bytes per pair")
    finally:
        gw.terminate()
        gw.wait(timeout=60)
        for k in r.scan_iter(match=f"{keys.prefix}:*", count=1000):
            r.delete(k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
