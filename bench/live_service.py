"""The service as a user runs it, for benchmarks: a real gateway process, a real worker process, Redis.

    with LiveService(redis_url, worker_args=["--backend", "vllm"]) as svc:
        svc.wait_worker_ready()          # model loaded / engine started, heartbeat published
        seconds, sums = svc.score(items)  # upload start -> dataset state `done`

Every key lives under a fresh GRAPE_KEY_PREFIX and is deleted at the end, so a shared Redis is safe.
The worker's output goes to a log file (vLLM prints its thread binding there).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis
from peerlib import ROOT

MODEL = "smollm2-135m"


def find_redis() -> tuple[str, Any]:
    """REDIS_URL, else 127.0.0.1:6379, else an embedded redis-server (returned so the caller stops it)."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url).ping()
        return url, None
    except redis.ConnectionError:
        if "REDIS_URL" in os.environ:
            raise
    from grape.redis_server import EmbeddedRedis

    server = EmbeddedRedis().start()
    return server.url, server


class LiveService:
    def __init__(self, redis_url: str, worker_args: list[str], log_dir: Path, label: str, dtype: str) -> None:
        self.redis_url = redis_url
        self.prefix = f"grape-peers-{uuid.uuid4().hex[:8]}"
        self.worker_args = ["--model", MODEL, "--dtype", dtype, *worker_args]
        self.log_path = log_dir / f"{label}.worker.log"
        self.gateway_log = log_dir / f"{label}.gateway.log"
        self.env = {**os.environ, "REDIS_URL": redis_url, "GRAPE_KEY_PREFIX": self.prefix, "PYTHONPATH": str(ROOT)}
        self.gateway: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.http: httpx.Client | None = None

    def __enter__(self) -> LiveService:
        from grape.redis_server import free_port

        port = free_port()
        with open(self.gateway_log, "wb") as log:
            self.gateway = subprocess.Popen(
                [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        self._wait(lambda: self.http.get("/healthz").status_code == 200, 60, "the gateway did not start")
        with open(self.log_path, "wb") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "workers", *self.worker_args], cwd=ROOT, env=self.env, stdout=log, stderr=log
            )
        return self

    def __exit__(self, *_: object) -> None:
        for proc, sig in ((self.worker, signal.SIGTERM), (self.gateway, signal.SIGTERM)):
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.http is not None:
            self.http.close()
        client = redis.Redis.from_url(self.redis_url)
        stale = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
        if stale:
            client.delete(*stale)

    def _wait(self, ready: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except httpx.TransportError:
                pass
            for proc in (self.gateway, self.worker):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{what}: a process exited with {proc.returncode} (see {self.log_path})")
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            time.sleep(0.2)

    def wait_worker_ready(self, timeout: float = 600) -> dict[str, Any]:
        """The worker's heartbeat (GET /v1/workers): it publishes one only once its backend is loaded."""
        found: list[dict[str, Any]] = []

        def ready() -> bool:
            found[:] = [w for w in self.http.get("/v1/workers").json()["workers"] if w["model"] == MODEL]
            return bool(found)

        self._wait(ready, timeout, "the worker did not become ready")
        return found[0]

    def score(self, items: list[dict], poll_s: float = 0.1) -> tuple[float, list[float], dict[str, Any]]:
        """Seconds from upload start to state `done`, every candidate's summed log-prob (item order),
        and the dataset's final status."""
        ds = self.http.post("/v1/datasets", json={"name": "peers", "target_model": MODEL}).json()["id"]
        body = b"".join(orjson.dumps(it) + b"\n" for it in items)
        t0 = time.perf_counter()
        resp = self.http.post(
            f"/v1/datasets/{ds}/items", content=body, headers={"Content-Type": "application/x-ndjson"}
        )
        resp.raise_for_status()
        while True:
            status = self.http.get(f"/v1/datasets/{ds}").json()
            if status["state"] == "done":
                break
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.worker.returncode} (see {self.log_path})")
            time.sleep(poll_s)
        seconds = time.perf_counter() - t0
        if status["failed_items"]:
            failures = self.http.get(f"/v1/datasets/{ds}/failures").json()
            raise RuntimeError(f"the service failed items: {failures}")
        sums: list[float] = []
        for it in items:
            got = self.http.get(f"/v1/datasets/{ds}/items/{it['id']}").json()
            sums += [c["logprob_sum"] for c in got["candidates"]]
        return seconds, sums, status
