"""What the machinery around the model costs: the queue, the worker loop, the gateway.

    python bench/pipeline.py                       # all four parts
    python bench/pipeline.py --parts null,fair     # a subset: null, ingest, efficiency, fair

Prints:
  (i)   null: pair-tokens/s one worker process (`grape worker --backend null`: tokenizes, checks, writes
        results, but every score is 0.0 at once) moves through the real queue; target >= 300,000.
  (ii)  ingest: pairs/s one gateway process accepts from concurrent NDJSON uploads; target >= 20,000.
  (iii) efficiency: the service end to end (gateway + Redis + one worker with its default backend, upload ->
        `done`) against the same backend called directly, in this process, on the same requests (the
        worker's own tokenization); target >= 95%.
  (iv)  fair: the fair share of one model's queue. A big dataset is queued, null-backend worker processes
        start on it, and a small one (400 pairs) is uploaded once the big one is being scored: how far the
        big one was when the small one was done (first come, first served: 100%; the fair share: a few
        percent), how long the small one took, and the rate of the whole run.

Real Redis (REDIS_URL, else 127.0.0.1:6379) under a key prefix of its own, removed afterwards; the real
pool from ../shared/data; real processes (`python -m service`, `python -m workers`). On a machine shared
with other work the figures are noisy: run it twice.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
POOL = ROOT.parent / "shared" / "data" / "alpaca_eval_pool_dev.jsonl"
MODEL = "smollm2-135m"

from grape.keys import Keys  # noqa: E402
from grape.redis_server import free_port  # noqa: E402


def pool(copies: int = 1, start: int = 0, n: int | None = None) -> list[dict[str, Any]]:
    rows = [orjson.loads(line) for line in POOL.read_bytes().splitlines() if line.strip()]
    rows = rows[start : start + n] if n is not None else rows
    items = []
    for c in range(copies):
        for row in rows:
            cands = [{"source": x["source"], "response": x["response"]} for x in row["candidates"]]
            items.append({"id": f"{row['id']}-c{c}", "instruction": row["instruction"], "candidates": cands})
    return items


def ndjson(items: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(i) + b"\n" for i in items)


class Service:
    """A gateway process and worker processes under one key prefix."""

    def __init__(self, redis_url: str, prefix: str, logs: Path) -> None:
        self.redis_url, self.prefix, self.logs = redis_url, prefix, logs
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPE_")}
        self.env |= {"REDIS_URL": redis_url, "GRAPE_KEY_PREFIX": prefix}
        self.procs: list[subprocess.Popen] = []
        self.url = ""

    def gateway(self, **env: str) -> str:
        port = free_port()
        log = open(self.logs / "gateway.log", "wb")  # noqa: SIM115 - closed with the process
        cmd = [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"]
        self.procs.append(subprocess.Popen(cmd, env=self.env | env, stdout=log, stderr=subprocess.STDOUT))
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("gateway did not start; see gateway.log")
            time.sleep(0.2)

    def worker(self, name: str, *args: str, **env: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "workers", "--model", MODEL, "--name", name, *args]
        proc = subprocess.Popen(cmd, env=self.env | env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def wait_ready(self, r: redis.Redis, name: str, proc: subprocess.Popen, timeout: float = 900) -> None:
        """Until the worker's first heartbeat: published once its model is loaded, right before it consumes."""
        deadline = time.monotonic() + timeout
        while not r.exists(Keys(self.prefix).worker(name)):
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited {proc.returncode}; see {self.logs / (name + '.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {name} did not start")
            time.sleep(0.1)

    def dataset(self, client: httpx.Client) -> str:
        r = client.post(f"{self.url}/v1/datasets", json={"name": "bench", "target_model": MODEL})
        r.raise_for_status()
        return r.json()["id"]

    def upload(self, client: httpx.Client, ds: str, body: bytes) -> dict[str, Any]:
        while True:
            r = client.post(
                f"{self.url}/v1/datasets/{ds}/items",
                content=body,
                headers={"content-type": "application/x-ndjson"},
                timeout=600,
            )
            if r.status_code == 429:  # a bounded number of concurrent uploads: wait as a client does
                time.sleep(float(r.headers.get("retry-after", "0.05")) / 20)
                continue
            r.raise_for_status()
            return r.json()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_done(client: httpx.Client, url: str, ds: str, poll: float = 0.02, timeout: float = 3600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = client.get(f"{url}/v1/datasets/{ds}").json()
        if st["state"] == "done":
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(st)
        time.sleep(poll)


def worker_seconds(r: redis.Redis, keys: Keys, ds: str) -> float:
    """Worker-side time of a dataset: its first claim to its last result write (the stats hash)."""
    st = {k.decode(): v.decode() for k, v in r.hgetall(keys.stats(ds)).items()}
    return float(st["t_last"]) - float(st["t_start"])


# (i) -----------------------------------------------------------------------------------------------------
def bench_null(svc: Service, r: redis.Redis, args: argparse.Namespace) -> None:
    items = pool(copies=args.null_copies)
    pairs = sum(len(i["candidates"]) for i in items)
    with httpx.Client(timeout=600) as client:
        ds = svc.dataset(client)
        for k in range(0, len(items), 500):  # queued first (under the 8 MiB body limit): the worker then
            svc.upload(client, ds, ndjson(items[k : k + 500]))  # only reads, scores and writes
        name = f"null-{uuid.uuid4().hex[:4]}"
        w = svc.worker(name, "--backend", "null", "--idle-exit", "3", *args.null_worker_args.split())
        svc.wait_ready(r, name, w)
        st = wait_done(client, svc.url, ds, poll=0.05)
        w.wait(timeout=120)
    seconds = worker_seconds(r, Keys(svc.prefix), ds)
    tokens = st["tokens_scored"]
    print(
        f"(i)   null backend, one worker process: {st['scored_items']} items, {pairs} pairs, {tokens:,} pair-tokens "
        f"in {seconds:.2f} s = {tokens / seconds:,.0f} pair-tokens/s ({pairs / seconds:,.0f} pairs/s; "
        f"target >= 300,000)",
        flush=True,
    )


# (iv) ----------------------------------------------------------------------------------------------------
def bench_fair(svc: Service, r: redis.Redis, args: argparse.Namespace) -> None:
    keys = Keys(svc.prefix)
    big = pool(copies=args.fair_copies)
    small = [{**it, "id": f"small-{it['id']}"} for it in pool(n=args.fair_small_items)]
    big_pairs, small_pairs = (sum(len(i["candidates"]) for i in x) for x in (big, small))

    def scored(ds: str) -> int:
        return int(r.hget(keys.stats(ds), "scored_candidates") or 0)

    with httpx.Client(timeout=600) as client:
        a, b = svc.dataset(client), svc.dataset(client)
        for k in range(0, len(big), 500):
            svc.upload(client, a, ndjson(big[k : k + 500]))
        names = [f"fair-{i}-{uuid.uuid4().hex[:4]}" for i in range(args.fair_workers)]
        procs = [svc.worker(n, "--backend", "null", "--idle-exit", "3") for n in names]
        for n, p in zip(names, procs, strict=True):
            svc.wait_ready(r, n, p)
        while (before := scored(a)) == 0:  # the big one is being scored: now the small one arrives
            time.sleep(0.005)
        t0 = time.perf_counter()
        svc.upload(client, b, ndjson(small))
        while scored(b) < small_pairs:  # polled every 5 ms: the big one's count is read within ~10 pairs
            time.sleep(0.005)
        small_s, at = time.perf_counter() - t0, scored(a)
        wait_done(client, svc.url, a, poll=0.05)
        for p in procs:
            p.wait(timeout=120)
    stats = [{k.decode(): float(v) for k, v in r.hgetall(keys.stats(ds)).items()} for ds in (a, b)]
    seconds = max(s["t_last"] for s in stats) - min(s["t_start"] for s in stats)
    tokens = sum(s["tokens"] for s in stats)
    print(
        f"(iv)  fair share, {args.fair_workers} null worker processes: {small_pairs} pairs uploaded when a "
        f"{big_pairs:,}-pair dataset was {before / big_pairs:.1%} scored were done after {small_s:.2f} s, when it "
        f"was {at / big_pairs:.1%} scored (first come, first served: 100%); both datasets: {tokens:,.0f} "
        f"pair-tokens in {seconds:.2f} s = {tokens / seconds:,.0f} pair-tokens/s",
        flush=True,
    )


# (ii) ----------------------------------------------------------------------------------------------------
def bench_ingest(svc: Service, r: redis.Redis, args: argparse.Namespace) -> None:
    items = pool(copies=max(1, -(-args.ingest_items // 403)))[: args.ingest_items]
    body = ndjson(items)
    pairs_per_upload = sum(len(i["candidates"]) for i in items)
    with httpx.Client(timeout=600) as client:
        datasets = [svc.dataset(client) for _ in range(args.ingest_uploads)]  # ids are new in each dataset
        svc.upload(client, svc.dataset(client), ndjson(items[:10]))  # warm the gateway's first request
    accepted = [0] * args.ingest_uploads
    pending = list(range(args.ingest_uploads))
    lock = threading.Lock()

    def client_thread() -> None:
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    if not pending:
                        return
                    k = pending.pop()
                accepted[k] = svc.upload(c, datasets[k], body)["accepted_candidates"]

    threads = [threading.Thread(target=client_thread) for _ in range(args.ingest_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    total = sum(accepted)
    assert total == pairs_per_upload * args.ingest_uploads, (total, pairs_per_upload)
    mb = len(body) * args.ingest_uploads / 1e6
    print(
        f"(ii)  gateway ingest, one process: {args.ingest_uploads} NDJSON uploads of {len(items)} items "
        f"({len(body) / 1e6:.1f} MB) from {args.ingest_clients} concurrent clients: {total:,} pairs in "
        f"{seconds:.2f} s = {total / seconds:,.0f} pairs/s ({mb / seconds:.1f} MB/s; target >= 20,000)",
        flush=True,
    )
    if args.ingest_profile:
        profile_ingest(items)


def profile_ingest(items: list[dict[str, Any]]) -> None:
    """Where one gateway process spends an upload's CPU: parsing + validation, in this process."""
    import cProfile
    import pstats

    from grape.settings import Settings
    from service.ingest import parse_upload

    body = ndjson(items)
    settings = Settings()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    good, _, _ = parse_upload(body, "application/x-ndjson", settings)
    prof.disable()
    seconds = time.perf_counter() - t0
    pairs = sum(len(i["candidates"]) for i in good)
    print(f"      parse_upload alone (profiled): {pairs / seconds:,.0f} pairs/s; top functions:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(8)


# (iii) ---------------------------------------------------------------------------------------------------
def bench_efficiency(svc: Service, r: redis.Redis, args: argparse.Namespace) -> None:
    from grape.models import resolve_model
    from grape.settings import Settings
    from workers.backends import load_backend
    from workers.main import backend_config, build_parser
    from workers.scoring import Prepared, prepare_items

    items = pool(start=args.eff_start, n=args.items)
    settings = Settings()
    # the backend exactly as `grape worker --model M` (no other flag) builds it
    config = backend_config(build_parser(settings).parse_args(["--model", resolve_model(MODEL)]), settings)
    backend = load_backend(settings.backend, config)
    name = backend.info()["backend"]
    prepared = [p for p in prepare_items(backend, [(it, "auto") for it in items]) if isinstance(p, Prepared)]
    requests = [q for p in prepared for q in p.requests]
    tokens = sum(q.length for q in requests)
    t0 = time.perf_counter()
    backend.score(requests)
    direct = time.perf_counter() - t0
    if hasattr(backend, "close"):
        backend.close()  # one engine at a time on this machine
    del backend
    print(
        f"(iii) {name} backend called directly: {len(requests)} pairs, {tokens:,} pair-tokens in {direct:.1f} s "
        f"= {tokens / direct:,.0f} pair-tok/s",
        flush=True,
    )

    wname = f"eff-{uuid.uuid4().hex[:4]}"
    w = svc.worker(wname)  # default settings and backend
    svc.wait_ready(r, wname, w)
    with httpx.Client(timeout=600) as client:
        ds = svc.dataset(client)
        t0 = time.perf_counter()
        svc.upload(client, ds, ndjson(items))
        st = wait_done(client, svc.url, ds)
        e2e = time.perf_counter() - t0
    w.terminate()
    w.wait(timeout=120)
    assert st["tokens_scored"] == tokens, (st["tokens_scored"], tokens)
    inside = worker_seconds(r, Keys(svc.prefix), ds)
    print(
        f"      the service end to end (upload -> done, default worker): {e2e:.1f} s = {tokens / e2e:,.0f} pair-tok/s "
        f"(worker's first claim to last write {inside:.1f} s)\n"
        f"      pipeline efficiency: {direct / e2e:.1%} of the backend called directly (target >= 95%)",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="null,ingest,efficiency,fair")
    ap.add_argument("--null-copies", type=int, default=4, help="(i) the real pool this many times (403 items each)")
    ap.add_argument("--null-worker-args", default="", help="(i) extra `grape worker` flags, e.g. '--read-count 8'")
    ap.add_argument("--ingest-uploads", type=int, default=16, help="(ii) uploads in all")
    ap.add_argument("--ingest-items", type=int, default=500, help="(ii) items per upload (real, ~8 pairs each)")
    ap.add_argument("--ingest-clients", type=int, default=8, help="(ii) concurrent clients")
    ap.add_argument("--ingest-profile", action="store_true", help="(ii) also profile parse_upload in this process")
    ap.add_argument("--items", type=int, default=8, help="(iii) real items (8 candidates each)")
    ap.add_argument("--eff-start", type=int, default=100, help="(iii) first item of the pool used")
    ap.add_argument("--fair-copies", type=int, default=8, help="(iv) the big dataset: the real pool this many times")
    ap.add_argument("--fair-small-items", type=int, default=50, help="(iv) the small dataset: items (8 pairs each)")
    ap.add_argument("--fair-workers", type=int, default=2, help="(iv) null-backend worker processes")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    r = redis.Redis.from_url(redis_url)
    print(f"pipeline bench: Redis {redis_url}, {os.cpu_count()} CPUs", flush=True)
    runs = [("null", bench_null), ("ingest", bench_ingest), ("efficiency", bench_efficiency), ("fair", bench_fair)]
    for part, run in runs:
        if part not in parts:
            continue
        # each part on a gateway and a key prefix of its own: nothing queued by one is in another's queue
        prefix = f"grape-bench-{uuid.uuid4().hex[:8]}"
        logs = Path(os.environ.get("TMPDIR", "/tmp")) / prefix
        logs.mkdir(parents=True)
        svc = Service(redis_url, prefix, logs)
        try:
            svc.gateway(GRAPE_MAX_QUEUE_CHUNKS="1000000")
            run(svc, r, args)
        finally:
            svc.close()
            stale = list(r.scan_iter(match=f"{prefix}:*", count=1000))
            for k in range(0, len(stale), 1000):
                r.delete(*stale[k : k + 1000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
