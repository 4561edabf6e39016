"""How the costs grow with the pool (issue 20): the same steps at 10k, 100k and 1M pairs, and the growth per row.

    python bench/scale.py                          # 10k and 100k pairs
    python bench/scale.py --pairs 10000,100000,1000000

Per size, under a key prefix of its own (removed afterwards), with a fresh gateway process (`python -m service`,
default settings) and `python -m workers --backend null` processes (bench/pipeline.py's Service):

  ingest, 4 clients       dataset B uploaded by 4 concurrent clients (NDJSON, --batch items per request)
  scoring, 2 workers      B scored by 2 null workers (first claim to last result, the stats hash); B is deleted
  ingest, 1 client        dataset A uploaded by one client
  scoring, 1 worker       A scored by 1 null worker
  GET /summary            of A, then GET /compare?strategies=grape,longest,random,source:X,
  GET /selection          ?strategy=grape (whole answer read: MB/s) and ?strategy=longest&n=100000
  Redis bytes per pair    INFO used_memory after A is stored and scored, minus before A, over A's pairs

Each read's gateway peak RSS is the process's VmHWM, reset before the read (`/proc/<pid>/clear_refs` 5); the
gateway's RSS after the reads is printed too. The pool is the dev pool (403 items, 3,224 pairs) repeated with
new ids. Redis: REDIS_URL, else 127.0.0.1:6379. Needs RAM for Redis to hold one dataset of the largest size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import Service, ndjson, pool, wait_done, worker_seconds  # noqa: E402

from grape.keys import Keys  # noqa: E402

SOURCE = "gpt4_1106_preview"
PAIRS_PER_ITEM = 8  # the dev pool: 3,224 pairs over 403 items


def items_for(pairs: int) -> list[dict[str, Any]]:
    n = max(1, round(pairs / PAIRS_PER_ITEM))
    return pool(copies=-(-n // 403))[:n]


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """The kernel's peak RSS (VmHWM) starts again from the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def upload_all(svc: Service, ds: str, items: list[dict[str, Any]], clients: int, batch: int) -> float:
    """Seconds to upload `items` in `batch`-item NDJSON requests from `clients` concurrent clients."""
    bodies = [ndjson(items[k : k + batch]) for k in range(0, len(items), batch)]
    lock = threading.Lock()
    accepted = [0]

    def run() -> None:
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    if not bodies:
                        return
                    body = bodies.pop()
                got = svc.upload(c, ds, body)["accepted"]
                with lock:
                    accepted[0] += got

    threads = [threading.Thread(target=run) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    assert accepted[0] == len(items), (accepted[0], len(items))
    return seconds


def score(svc: Service, r: redis.Redis, client: httpx.Client, ds: str, workers: int) -> float:
    """Seconds the null workers took on `ds` (first claim to last result)."""
    names = [f"null-{i}-{uuid.uuid4().hex[:4]}" for i in range(workers)]
    procs = [svc.worker(n, "--backend", "null", "--idle-exit", "3") for n in names]
    for n, p in zip(names, procs, strict=True):
        svc.wait_ready(r, n, p)
    wait_done(client, svc.url, ds, poll=0.5, timeout=7200)
    for p in procs:
        p.wait(timeout=120)
    return worker_seconds(r, Keys(svc.prefix), ds)


def timed_read(pid: int, fetch: Callable[[], int]) -> tuple[float, float, int]:
    """(seconds, gateway peak RSS in MB during the read, bytes of the answer)."""
    reset_peak(pid)
    t0 = time.perf_counter()
    size = fetch()
    return time.perf_counter() - t0, status_kb(pid, "VmHWM") / 1024, size


def get_bytes(client: httpx.Client, url: str, **params: Any) -> int:
    size = 0
    with client.stream("GET", url, params=params, timeout=3600) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_bytes():
            size += len(chunk)
    return size


def run_size(pairs: int, args: argparse.Namespace, r: redis.Redis, logs: Path) -> dict[str, tuple[float, str]]:
    """The rows at one size: name -> (value, its text)."""
    prefix = f"bench-scale-{uuid.uuid4().hex[:8]}"
    svc = Service(args.redis_url, prefix, logs)
    rows: dict[str, tuple[float, str]] = {}
    items = items_for(pairs)
    n_pairs = sum(len(i["candidates"]) for i in items)
    try:
        svc.gateway()
        gw = svc.procs[0].pid
        with httpx.Client(timeout=600) as client:
            b = svc.dataset(client)
            s = upload_all(svc, b, items, 4, args.batch)
            rows["ingest, 4 clients (pairs/s)"] = (n_pairs / s, f"{s:.1f} s ({n_pairs / s:,.0f} pairs/s)")
            s = score(svc, r, client, b, 2)
            rows["scoring, 2 null workers"] = (s, f"{s:.1f} s ({n_pairs / s:,.0f} pairs/s)")
            client.delete(f"{svc.url}/v1/datasets/{b}").raise_for_status()

            before = int(r.info("memory")["used_memory"])
            a = svc.dataset(client)
            s = upload_all(svc, a, items, 1, args.batch)
            rows["ingest, 1 client (pairs/s)"] = (n_pairs / s, f"{s:.1f} s ({n_pairs / s:,.0f} pairs/s)")
            s = score(svc, r, client, a, 1)
            rows["scoring, 1 null worker"] = (s, f"{s:.1f} s ({n_pairs / s:,.0f} pairs/s)")
            per_pair = (int(r.info("memory")["used_memory"]) - before) / n_pairs
            rows["Redis bytes per pair (used_memory)"] = (per_pair, f"{per_pair:,.0f} B")
            # the same from this prefix's keys alone: other clients of a shared Redis do not move it
            keys_bytes = sum(r.memory_usage(k, samples=0) or 0 for k in r.scan_iter(match=f"{prefix}:*", count=10_000))
            rows["Redis bytes per pair (MEMORY USAGE)"] = (keys_bytes / n_pairs, f"{keys_bytes / n_pairs:,.0f} B")

            base = f"{svc.url}/v1/datasets/{a}"
            reads = {
                "GET /summary": lambda: get_bytes(client, f"{base}/summary"),
                f"GET /compare grape,longest,random,source:{SOURCE}": lambda: get_bytes(
                    client, f"{base}/compare", strategies=f"grape,longest,random,source:{SOURCE}"
                ),
                "GET /selection grape": lambda: get_bytes(client, f"{base}/selection", strategy="grape"),
                "GET /selection longest&n=100000": lambda: get_bytes(
                    client, f"{base}/selection", strategy="longest", n=100000
                ),
            }
            peak = 0.0
            for name, fetch in reads.items():
                s, rss, size = timed_read(gw, fetch)
                peak = max(peak, rss)
                extra = f", {size / 1e6:.0f} MB at {size / 1e6 / s:.0f} MB/s" if "selection" in name else ""
                rows[name] = (s, f"{s:.2f} s{extra}, peak RSS {rss:.0f} MB")
            rows["gateway peak RSS in a read (MB)"] = (peak, f"{peak:.0f} MB")
            after = status_kb(gw, "VmRSS") / 1024
            rows["gateway RSS after the reads (MB)"] = (after, f"{after:.0f} MB")
    finally:
        svc.close()
        for key in r.scan_iter(match=f"{prefix}:*", count=10_000):
            r.delete(key)
    return rows


def print_table(sizes: list[int], results: list[dict[str, tuple[float, str]]]) -> None:
    """The rows of the sizes measured so far, a growth column per step."""
    sizes = sizes[: len(results)]
    labels = [f"{p / 1000:g}k" if p < 1_000_000 else f"{p / 1_000_000:g}M" for p in sizes]
    growth = [f"{labels[i]}/{labels[i - 1]}" for i in range(1, len(sizes))]
    print()
    print("| " + " | ".join(["step", *(f"{lab} pairs" for lab in labels), *growth]) + " |")
    print("|---" * (1 + len(sizes) + len(growth)) + "|")
    for name in results[0]:
        cells = [res[name][1] for res in results]
        ratios = [f"{results[i][name][0] / results[i - 1][name][0]:.2f}x" for i in range(1, len(sizes))]
        print("| " + " | ".join([name, *cells, *ratios]) + " |")
    steps = ", ".join(f"{sizes[i] / sizes[i - 1]:g}x" for i in range(1, len(sizes)))
    print(f"\npool growth per step: {steps or '-'}; a row growing faster than the pool costs more per pair", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="10000,100000", help="pool sizes in pairs, comma-separated")
    ap.add_argument("--batch", type=int, default=300, help="items per upload request")
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = ap.parse_args()
    sizes = [int(p) for p in args.pairs.split(",")]
    r = redis.Redis.from_url(args.redis_url)
    logs = Path(tempfile.mkdtemp(prefix="grape-scale-"))
    print(f"load average before: {os.getloadavg()}; logs in {logs}", flush=True)
    results = []
    for pairs in sizes:
        t0 = time.perf_counter()
        results.append(run_size(pairs, args, r, logs))
        print(f"{pairs:,} pairs done in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()}", flush=True)
        print_table(sizes, results)  # after each size: a run stopped later keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
