"""Fixtures: a real Redis (REDIS_URL, else 127.0.0.1:6379, else a private redis-server), the real
bundled SmolLM2 model, and the real candidate pool from ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from grape.keys import Keys
from grape.models import resolve_model
from grape.redis_server import EmbeddedRedis
from grape.settings import Settings
from service.app import create_app
from trainer.loop import TrainerLoop
from workers.backends import BackendConfig, load_backend
from workers.loop import Worker

# TestClient sends `Host: testserver`; a gateway without API keys answers only local names and these
os.environ.setdefault("GRAPE_ALLOWED_HOSTS", "testserver")

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT.parent / "shared" / "data" / "alpaca_eval_pool_dev.jsonl"
MODEL = "smollm2-135m"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url).ping()
        yield url
        return
    except redis.ConnectionError:
        if "REDIS_URL" in os.environ:
            raise
    with EmbeddedRedis() as server:  # no Redis on this machine: a real one of our own
        yield server.url


@pytest.fixture
def keys(redis_url: str) -> Iterator[Keys]:
    """A key prefix of its own per test, removed afterwards: tests never see each other's data."""
    k = Keys(f"grape-test-{uuid.uuid4().hex[:8]}")
    yield k
    client = redis.Redis.from_url(redis_url)
    stale = list(client.scan_iter(match=f"{k.prefix}:*", count=1000))
    if stale:
        client.delete(*stale)


@pytest.fixture
def rclient(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def settings(redis_url: str, keys: Keys) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=keys.prefix, chunk_pairs=16)


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="session")
def model_path() -> str:
    return resolve_model(MODEL)


@pytest.fixture(scope="session")
def hf_backend(model_path: str) -> Any:
    return load_backend("hf", BackendConfig(model=model_path, dtype="float32", device="cpu", batch_tokens=4096))


def load_pool(n: int, *, max_chars: int = 500, start: int = 0, candidates: int | None = None) -> list[dict]:
    """n real items; responses cut to `max_chars` characters so CPU tests stay fast."""
    if not POOL.exists():
        raise FileNotFoundError(f"the real pool is expected at {POOL} (shared/data beside the repository)")
    rows = []
    with open(POOL, "rb") as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if len(rows) == n:
                break
            row = orjson.loads(line)
            cands = row["candidates"][:candidates] if candidates else row["candidates"]
            rows.append(
                {
                    "id": row["id"],
                    "instruction": row["instruction"],
                    "candidates": [{"source": c["source"], "response": c["response"][:max_chars]} for c in cands],
                }
            )
    return rows


@pytest.fixture
def worker_factory(rclient: redis.Redis, keys: Keys, hf_backend: Any) -> Iterator[Any]:
    """Workers on the real backend, run in threads of this process (the model is loaded once)."""
    running: list[tuple[Worker, threading.Thread]] = []

    def start(backend: Any = None, model: str = MODEL, **kw: Any) -> Worker:  # kw: task="rating", ...
        kw.setdefault("block_ms", 200)
        w = Worker(rclient, keys, model, backend or hf_backend, **kw)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        running.append((w, t))
        return w

    yield start
    for w, _ in running:
        w.stop()
    for _, t in running:
        t.join(timeout=120)


@pytest.fixture
def trainer_factory(rclient, keys, settings, tmp_path):
    """Trainer loops in threads of this process (launcher `inline` unless asked), GRAPE_TRAIN_DIR in tmp_path."""
    running: list[tuple[TrainerLoop, threading.Thread]] = []
    train_settings = settings.model_copy(update={"train_dir": tmp_path / "train", "trainer_heartbeat_s": 5.0})

    def start(**kw: Any) -> TrainerLoop:
        kw.setdefault("block_s", 0.2)
        loop = TrainerLoop(rclient, keys, train_settings, **kw)
        t = threading.Thread(target=loop.run, daemon=True)
        t.start()
        running.append((loop, t))
        return loop

    start.settings = train_settings  # type: ignore[attr-defined]
    yield start
    for loop, _ in running:
        loop.stop()
    for _, t in running:
        t.join(timeout=300)


def wait_done(api: TestClient, ds: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = api.get(f"/v1/datasets/{ds}").json()
        if st["state"] == "done":
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(st)
        time.sleep(0.2)


def create(api: TestClient, template: str = "auto") -> str:
    r = api.post("/v1/datasets", json={"name": "t", "target_model": MODEL, "template": template})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def ndjson(items: list[dict]) -> bytes:
    return b"".join(orjson.dumps(i) + b"\n" for i in items)


def start_gateway(redis_url: str, keys: Keys, *args: str, **env: str) -> tuple[subprocess.Popen, str]:
    """The real gateway under uvicorn in its own process, on a free port (`args`: more `grape serve` flags)."""
    from grape.redis_server import free_port

    port = free_port()
    full = {**os.environ, "REDIS_URL": redis_url, "GRAPE_KEY_PREFIX": keys.prefix, **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning", *args],
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("gateway did not start")
        time.sleep(0.2)


@pytest.fixture
def live_gateway(redis_url: str, keys: Keys) -> Iterator[str]:
    proc, url = start_gateway(redis_url, keys)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
