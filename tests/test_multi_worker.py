"""A fleet on one machine: three worker processes score one dataset together.

Each worker is a real `python -m workers` process with its own metrics port; what each one wrote is
read back from its /metrics, so the test sees both that every candidate was scored exactly once
(the workers' write counts add up to the dataset's pairs, no more) and that the work was spread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from grape.keys import GROUP
from grape.redis_server import free_port
from grape.settings import Settings
from grape.store.codec import decode_scores
from service.app import create_app
from tests.conftest import MODEL, create, load_pool, wait_done
from tests.test_metrics import samples, value

N_WORKERS = 3


def _spawn(redis_url: str, prefix: str, name: str, port: int, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "GRAPE_KEY_PREFIX": prefix,
        "GRAPE_BLOCK_MS": "200",
        # three processes on a small machine: one thread each instead of all of them fighting for every core
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    # the hf backend: three vLLM engines (the default where vllm imports) would need ~3 x 3 GB here, and the
    # fleet's bookkeeping, not the engine, is what this test is about (tests/test_faults.py runs vLLM workers)
    cmd = [sys.executable, "-m", "workers", "--model", MODEL, "--name", name, "--read-count", "1", "--backend", "hf",
           "--commit-tokens", "256", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_three_workers_score_one_dataset_each_candidate_once(redis_url, keys, rclient, model_path, tmp_path) -> None:
    # one instruction (4 candidates) per chunk: six chunks for three workers that take one at a time
    settings = Settings(redis_url=redis_url, key_prefix=keys.prefix, chunk_pairs=4)
    items = load_pool(6, start=120, max_chars=300, candidates=4)
    ports = [free_port() for _ in range(N_WORKERS)]
    logs = [tmp_path / f"worker-{i}.log" for i in range(N_WORKERS)]
    procs = [_spawn(redis_url, keys.prefix, f"fleet-{i}", ports[i], logs[i]) for i in range(N_WORKERS)]
    try:
        deadline = time.monotonic() + 300
        while not all(_ready(p) for p in ports):  # model loaded, Redis answers: the readiness probe
            for proc, log in zip(procs, logs, strict=True):
                assert proc.poll() is None, f"worker exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "workers did not become ready"
            time.sleep(0.3)

        with TestClient(create_app(settings)) as api:
            ds = create(api)
            assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 6
            assert rclient.xlen(keys.stream(MODEL)) == 6
            st = wait_done(api, ds, timeout=600)
            assert api.get("/v1/datasets").json()["datasets"][0]["workers"] == N_WORKERS

        n_pairs = sum(len(it["candidates"]) for it in items)
        assert (st["scored_items"], st["scored_candidates"], st["failed_items"]) == (6, n_pairs, 0)

        # what each worker wrote, from its own /metrics
        labels = {"model": MODEL, "task": "logprob", "dataset": ds}
        per_worker = []
        for port in ports:
            parsed = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
            per_worker.append(
                (
                    value(parsed, "grape_worker_pairs_scored_total", **labels) or 0,
                    value(parsed, "grape_worker_items_scored_total", **labels) or 0,
                    value(parsed, "grape_worker_tokens_scored_total", **labels) or 0,
                )
            )
        pairs, scored_items, tokens = (sum(col) for col in zip(*per_worker, strict=True))
        assert pairs == n_pairs, per_worker  # every candidate written once: no chunk was scored twice
        assert scored_items == 6 and tokens == st["tokens_scored"]
        assert all(p > 0 for p, _, _ in per_worker), f"a worker scored nothing: {per_worker}"

        # and in Redis: one score per candidate, the queue drained and acknowledged
        stored = rclient.hgetall(keys.scores(ds))
        assert sorted(k.decode() for k in stored) == sorted(it["id"] for it in items)
        for it in items:
            scores = decode_scores(stored[it["id"].encode()])
            assert len(scores) == 4 and all(s["tokens"] > 0 for s in scores)
        assert rclient.xlen(keys.stream(MODEL)) == 0
        assert rclient.xpending(keys.stream(MODEL), GROUP)["pending"] == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
