"""`grape serve --workers N`: N gateway processes on one port. Nothing an answer depends on is kept in one
process alone (quotas, counters and queues are in Redis, caches are checked against Redis counters), so
uploads spread over the processes store exactly what one process would."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psutil

from tests.conftest import MODEL, start_gateway
from tests.test_tenancy import API_KEYS, auth, items


def serving(proc: psutil.Process, n: int, timeout: float = 60) -> list[psutil.Process]:
    """The gateway's `n` worker processes (uvicorn spawns them; multiprocessing's resource tracker aside), once
    all are up: /healthz answered as soon as the first was."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for p in proc.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if "spawn_main" in " ".join(p.cmdline()):
                    found.append(p)
        if len(found) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # started: a process still importing the app is busy; once every one is idle, all of them accept
    while time.monotonic() < deadline:
        before = [cpu(p) for p in found]
        time.sleep(0.5)
        if all(cpu(p) - b < 0.05 for p, b in zip(found, before, strict=True)):
            break
    return found


def cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def test_two_processes_serve_and_the_quota_stays_exact_across_them(redis_url, keys) -> None:
    proc, url = start_gateway(
        redis_url,
        keys,
        "--workers",
        "2",
        GRAPE_API_KEYS=API_KEYS,
        GRAPE_QUOTA_STORED_PAIRS="1000",
        GRAPE_MAX_CONCURRENT_UPLOADS="8",
        GRAPE_CHUNK_PAIRS="8",
    )
    try:
        workers = serving(psutil.Process(proc.pid), 2)
        assert len(workers) == 2, workers
        with httpx.Client(base_url=url, headers=auth("alpha"), timeout=120) as c:
            dss = [c.post("/v1/datasets", json={"name": "d", "target_model": MODEL}).json()["id"] for _ in range(2)]
        before = [cpu(p) for p in workers]
        lock = threading.Lock()
        answers: list[dict[str, Any]] = []

        local = threading.local()
        opened: list[httpx.Client] = []

        def upload(i: int) -> None:
            # one client per thread, as a user's uploader keeps one: the gateway closes the connection after each
            # upload, so the next one goes to whichever process the kernel hands the new connection to
            if not hasattr(local, "c"):
                local.c = httpx.Client(base_url=url, headers=auth("alpha"), timeout=120)
                opened.append(local.c)
            body = {"items": items(150, 3, f"u{i}-")}  # 450 pairs an upload, 16 uploads: 7,200 offered
            r = local.c.post(f"/v1/datasets/{dss[i % 2]}/items", json=body)
            with lock:
                answers.append({"status": r.status_code, "connection": r.headers.get("connection"), **r.json()})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(upload, range(16)))
        for client in opened:
            client.close()
        used = [cpu(p) - b for p, b in zip(workers, before, strict=True)]
        assert all(a["status"] in (202, 403) for a in answers), answers
        assert all(a["connection"] == "close" for a in answers if a["status"] == 202), answers
        accepted = sum(3 * a.get("accepted", 0) for a in answers)
        assert accepted == 1000 - 1000 % 3, answers  # whole items only: 333 items of 3 pairs
        with httpx.Client(base_url=url, headers=auth("alpha"), timeout=60) as c:
            stored = sum(c.get(f"/v1/datasets/{d}").json()["candidates"] for d in dss)
            usage = c.get("/v1/usage").json()["usage"]["stored_pairs"]
        assert stored == usage == accepted
        # both processes did a real share of the work (each parses and stores the uploads it was handed)
        assert min(used) > 0.2 * sum(used), used
    finally:
        proc.terminate()
        proc.wait(timeout=30)
