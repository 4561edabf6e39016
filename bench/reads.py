"""The reads a user makes of a big scored pool, timed, with the gateway's peak RSS per read (issue 20).

    PYTHONPATH=. .venv/bin/python bench/reads.py --pairs 10000 100000 1000000

Per size: a pool of that many pairs (the dev pool repeated with new ids, 8 responses an instruction) is uploaded
through a real gateway (a subprocess, tests/conftest.py `start_gateway`) and scored with synthetic values written
through the workers' own results script (what `--backend null` workers would write, without their time),
while `/summary` is polled the way the status page does. Then, one at a time: `/summary` right after the last
scores (kept), `/summary` of a fresh gateway (the tally kept in Redis), its `?reduce=sum` (never asked before:
counted from the pool), `/compare` of
grape,longest,random,source:X, `GET /selection?strategy=grape` (MB/s) and `?strategy=longest&n=100000`. The
gateway's peak RSS (VmHWM) is reset before each read (/proc/PID/clear_refs) and read after it; its RSS after
the read shows what it keeps; the gateway's CPU seconds are given for the longest reads (on a shared machine the
wall time moves with the load, the CPU time much less). The last column divides each figure by the previous
size's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grape.keys import Keys  # noqa: E402
from grape.store import summaries  # noqa: E402
from grape.store.io import call  # noqa: E402
from grape.store.scoring import ItemResult, results  # noqa: E402
from tests.conftest import MODEL, POOL, start_gateway  # noqa: E402


def status(pid: int, field: str) -> float:
    """A /proc/PID/status field in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := the current RSS


def items_for(pairs: int) -> list[dict[str, Any]]:
    """pairs / 8 items: the dev pool (8 responses an instruction) repeated, each copy with new ids."""
    base = [orjson.loads(line) for line in POOL.read_bytes().splitlines() if line.strip()]
    return [
        {"id": f"{row['id']}-r{i // len(base)}", "instruction": row["instruction"], "candidates": row["candidates"]}
        for i in range(-(-pairs // 8))
        for row in (base[i % len(base)],)
    ]


def fake_scores(it: dict[str, Any]) -> list[dict[str, Any]]:
    """Deterministic per item and candidate, varied: what a scorer would write."""
    h = hash(it["id"]) % 1000 / 1000
    return [
        {
            "logprob_sum": -(0.2 + (h + j * 0.37) % 1.5) * (len(c["response"]) // 4 + 1),
            "tokens": len(c["response"]) // 4 + 1,
            "prompt_tokens": len(it["instruction"]) // 4 + 1,
        }
        for j, c in enumerate(it["candidates"])
    ]


def cpu(pid: int) -> float:
    """CPU seconds the process has used (user + system, all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CPU: dict[str, float] = {}
"""The gateway's CPU seconds in the last `timed` read (beside the wall time: on a shared machine the wall time
moves with the load, the CPU time much less)."""


def timed(fn: Any, pid: int) -> tuple[float, float, float, Any]:
    """(seconds, peak RSS MB during, RSS MB after, result); the gateway's CPU seconds in CPU["last"]."""
    reset_peak(pid)
    c0 = cpu(pid)
    t0 = time.perf_counter()
    out = fn()
    took = time.perf_counter() - t0
    CPU["last"] = cpu(pid) - c0
    time.sleep(0.3)
    return took, status(pid, "VmHWM"), status(pid, "VmRSS"), out


def run_size(redis_url: str, pairs: int) -> dict[str, Any]:
    keys = Keys(f"bench-reads-{uuid.uuid4().hex[:8]}")
    r = redis.Redis.from_url(redis_url)
    env = {"GRAPE_MAX_QUEUE_CHUNKS": str(10**9)}
    proc, url = start_gateway(redis_url, keys, **env)
    row: dict[str, Any] = {"pairs": pairs}
    try:
        c = httpx.Client(base_url=url, timeout=600)
        ds = c.post("/v1/datasets", json={"name": "reads", "target_model": MODEL}).json()["id"]
        items = items_for(pairs)
        t0 = time.perf_counter()
        for start in range(0, len(items), 300):
            body = b"".join(orjson.dumps(it) + b"\n" for it in items[start : start + 300])
            resp = c.post(f"/v1/datasets/{ds}/items", content=body, headers={"Content-Type": "application/x-ndjson"})
            resp.raise_for_status()
        row["upload_s"] = time.perf_counter() - t0
        r.delete(keys.stream(MODEL))  # no worker reads it: the scores are written below
        t0 = time.perf_counter()
        polls = 0
        for start in range(0, len(items), 250):
            rows = [ItemResult(it["id"], len(it["candidates"]), fake_scores(it)) for it in items[start : start + 250]]
            call(r, results(keys, "logprob", MODEL, ds, "", time.time(), rows))
            if start % 5000 == 0:  # the status page polls while the dataset scores
                c.get(f"/v1/datasets/{ds}/summary").raise_for_status()
                polls += 1
        row["score_s"] = time.perf_counter() - t0
        del items
        pid = proc.pid
        row["rss_idle_mb"] = status(pid, "VmRSS")
        row["summary_kept_s"], row["summary_kept_peak_mb"], _, _ = timed(
            lambda: c.get(f"/v1/datasets/{ds}/summary").raise_for_status(), pid
        )
        source = "gpt4_1106_preview"
        strategies = f"grape,longest,random,source:{source}"
        row["compare_s"], row["compare_peak_mb"], row["compare_after_mb"], _ = timed(
            lambda: c.get(f"/v1/datasets/{ds}/compare", params={"strategies": strategies}).raise_for_status(), pid
        )
        row["compare_cpu_s"] = CPU["last"]

        def export(**params: Any) -> int:
            n = 0
            with c.stream("GET", f"/v1/datasets/{ds}/selection", params=params) as resp:
                resp.raise_for_status()
                for chunk in resp.iter_bytes():
                    n += len(chunk)
            return n

        took, row["grape_peak_mb"], row["grape_after_mb"], size = timed(lambda: export(strategy="grape"), pid)
        row["grape_s"], row["grape_mb"], row["grape_mb_s"] = took, size / 1e6, size / 1e6 / took
        row["grape_cpu_s"] = CPU["last"]
        row["longest_s"], row["longest_peak_mb"], row["longest_after_mb"], _ = timed(
            lambda: export(strategy="longest", n=100_000), pid
        )
        row["used_memory_mb"] = r.info("memory")["used_memory"] / 1e6
        held = [keys.items(ds), keys.facts(ds), keys.scores(ds), keys.order(ds), keys.stats(ds), keys.dataset(ds)]
        held += summaries.all_keys(keys, ds)
        row["redis_bytes_per_pair"] = sum(r.memory_usage(k, samples=0) or 0 for k in held) / pairs
        # a fresh gateway: the summary from the tally the first one kept in Redis
        proc.terminate()
        proc.wait(timeout=30)
        proc, url = start_gateway(redis_url, keys, **env)
        c = httpx.Client(base_url=url, timeout=600)
        row["summary_cold_s"], row["summary_cold_peak_mb"], _, _ = timed(
            lambda: c.get(f"/v1/datasets/{ds}/summary").raise_for_status(), proc.pid
        )
        # reduce=sum was never asked: no tally kept anywhere, counted from the pool once
        row["summary_scratch_s"], row["summary_scratch_peak_mb"], _, _ = timed(
            lambda: c.get(f"/v1/datasets/{ds}/summary", params={"reduce": "sum"}).raise_for_status(), proc.pid
        )
        row["summary_scratch_cpu_s"] = CPU["last"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        stale = list(r.scan_iter(match=f"{keys.prefix}:*", count=1000))
        for i in range(0, len(stale), 1000):
            r.delete(*stale[i : i + 1000])
    return row


ROWS = [
    ("upload (1 client, NDJSON batches of 300)", "upload_s", "s"),
    ("scores written (results script)", "score_s", "s"),
    ("gateway RSS before the reads", "rss_idle_mb", "MB"),
    ("GET /summary after the last scores (kept)", "summary_kept_s", "s"),
    ("  peak RSS", "summary_kept_peak_mb", "MB"),
    ("GET /summary, fresh gateway (the tally kept in Redis)", "summary_cold_s", "s"),
    ("  peak RSS", "summary_cold_peak_mb", "MB"),
    ("GET /summary?reduce=sum, fresh gateway (none kept: the pool read once)", "summary_scratch_s", "s"),
    ("  gateway CPU", "summary_scratch_cpu_s", "s"),
    ("  peak RSS", "summary_scratch_peak_mb", "MB"),
    ("GET /compare grape,longest,random,source:X", "compare_s", "s"),
    ("  gateway CPU", "compare_cpu_s", "s"),
    ("  peak RSS", "compare_peak_mb", "MB"),
    ("  RSS after", "compare_after_mb", "MB"),
    ("GET /selection?strategy=grape", "grape_s", "s"),
    ("  NDJSON", "grape_mb", "MB"),
    ("  streamed at", "grape_mb_s", "MB/s"),
    ("  gateway CPU", "grape_cpu_s", "s"),
    ("  peak RSS", "grape_peak_mb", "MB"),
    ("GET /selection?strategy=longest&n=100000", "longest_s", "s"),
    ("  peak RSS", "longest_peak_mb", "MB"),
    ("  RSS after", "longest_after_mb", "MB"),
    ("Redis bytes per pair (the dataset's keys)", "redis_bytes_per_pair", "B"),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    rows = []
    for pairs in args.pairs:
        rows.append(run_size(args.redis_url, pairs))
        print(f"{pairs} pairs: {rows[-1]}", file=sys.stderr, flush=True)
    head = ["step", *(f"{row['pairs']:,} pairs" for row in rows), "growth (last / previous)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, key, unit in ROWS:
        cells = [f"{row[key]:.{0 if unit in ('MB', 'B') and row[key] >= 10 else 2}f} {unit}" for row in rows]
        growth = f"{rows[-1][key] / rows[-2][key]:.2f}x" if len(rows) > 1 and rows[-2][key] else "-"
        print("| " + " | ".join([label, *cells, growth]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
