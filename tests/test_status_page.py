"""The status page in a real browser, and the summary endpoint it draws from.

Headless Chromium (Debian's `chromium`, installed by the test when missing) opens the page served by
a real gateway process while a real worker process scores a dataset, sees the progress bar advance and
the wins chart drawn, and saves a screenshot in the test's temporary directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from grape.jobs import log_fields
from grape.redis_server import free_port
from tests.cdp import Browser
from tests.conftest import MODEL, create, load_pool, wait_done
from tests.system_packages import ensure_binary

API_KEY = "status-page-key"


@pytest.fixture(scope="session")
def chromium() -> str:
    return ensure_binary("chromium", "chromium")


def _wait(cond, timeout: float, what: str, procs: dict[str, tuple[subprocess.Popen, Path]]):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        for name, (proc, log) in procs.items():
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_status_page_shows_progress_and_wins_while_scoring(chromium, redis_url, keys, model_path, tmp_path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "GRAPE_KEY_PREFIX": keys.prefix,
        "GRAPE_API_KEYS": API_KEY,
        "GRAPE_CHUNK_PAIRS": "4",  # one instruction per chunk: progress moves item by item
        "GRAPE_BLOCK_MS": "200",
    }
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def spawn(name: str, cmd: list[str]) -> None:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            procs[name] = (subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), log)

    try:
        spawn("gateway", [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"])
        http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)

        def up() -> bool:
            try:
                return http.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        _wait(up, 60, "the gateway", procs)
        r = http.post("/v1/datasets", json={"name": "status page run", "target_model": MODEL})
        assert r.status_code == 201, r.text
        ds = r.json()["id"]
        items = load_pool(6, start=200, max_chars=300, candidates=4)
        assert http.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 6
        total = sum(len(it["candidates"]) for it in items)

        with Browser(chromium, width=1280, height=1100, log=tmp_path / "chromium.log") as page:
            page.call(
                "Page.addScriptToEvaluateOnNewDocument",
                source="window.__errors = []; addEventListener('error', e => __errors.push(String(e.message)));",
            )
            page.navigate(base + "/")
            # the gateway has keys: the page asks for one, as a person would type it
            page.wait_for("!document.getElementById('key-form').hidden", 20)
            page.eval(
                f"document.getElementById('key-input').value = {orjson.dumps(API_KEY).decode()};"
                "document.getElementById('key-form').requestSubmit(); true"
            )
            row = f"document.querySelector('tr[data-dataset=\"{ds}\"]')"
            page.wait_for(f"{row} !== null", 20)
            progress = f"{row}.querySelector('progress')"
            seen = [int(page.eval(f"{progress}.value"))]
            assert seen == [0] and int(page.eval(f"{progress}.max")) == total

            # now a worker starts scoring; the page, polling on its own, must show the bar moving
            spawn("worker", [sys.executable, "-m", "workers", "--model", MODEL, "--read-count", "1",
                             "--commit-tokens", "256"])  # fmt: skip

            def progressed() -> bool:
                now = int(page.eval(f"{progress}.value"))
                if now != seen[-1]:
                    seen.append(now)
                return now == total

            _wait(progressed, 600, "the page to show every pair scored", procs)
            assert seen == sorted(seen) and len(seen) >= 3, f"progress seen by the page: {seen}"
            assert any(0 < v < total for v in seen)
            assert page.eval(f"{row}.querySelector('.state').textContent") == "done"
            # the live worker and what it scores with
            page.wait_for("document.querySelector('#workers tr[data-worker]') !== null", 20)
            cells = page.eval("[...document.querySelectorAll('#workers tr[data-worker] td')].map((c) => c.textContent)")
            assert cells[1:5] == [MODEL, "logprob", "hf", "shared-prefix+response-rows-projection"], cells
            assert page.eval("document.getElementById('workers-section').hidden") is False

            # the wins chart: one bar per source, the bars add up to one win per instruction
            page.wait_for("document.getElementById('wins-chart').dataset.wins === '6'", 30)
            chart = page.eval(
                "(() => { const c = Chart.getChart('wins-chart');"
                " return {labels: c.data.labels, data: c.data.datasets[0].data}; })()"
            )
            sources = {c["source"] for it in items for c in it["candidates"]}
            assert len(chart["labels"]) == len(sources) and sum(chart["data"]) == 6
            assert all(any(label.startswith(s) for s in sources) for label in chart["labels"])
            # and it is drawn: the canvas has painted pixels
            painted = page.eval(
                "(() => { const c = document.getElementById('wins-chart');"
                " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; })()"
            )
            assert painted > 1000
            assert page.eval("Chart.getChart('hist-chart').data.datasets[0].data.reduce((a, b) => a + b, 0)") == 6
            # a training job on the selection, created through the API; its progress is written the way a
            # trainer writes it (heartbeat, job hash, log records with step and loss): no TRL run here
            r = http.post("/v1/training-jobs", json={"dataset_id": ds})
            assert r.status_code == 201, r.text
            job = r.json()["id"]
            losses = [2.41, 2.12, 1.93, 1.71, 1.62]
            rc = redis.Redis.from_url(redis_url)
            rc.set(keys.trainer("page-trainer"), b"{}", ex=120)
            for step, loss in enumerate(losses, start=1):
                rc.xadd(keys.job_log(job), log_fields(f"step {step}: loss {loss}", step=step, loss=loss))
            rc.hset(
                keys.job(job),
                mapping={"state": "running", "trainer": "page-trainer", "step": "5", "max_steps": "10",
                         "loss": "1.62", "started": f"{time.time():.3f}"},
            )  # fmt: skip
            job_row = f"document.querySelector('tr[data-job=\"{job}\"]')"
            page.wait_for(f"{job_row} !== null && {job_row}.querySelector('progress') !== null", 30)
            assert page.eval(f"{job_row}.querySelector('progress').value") == 5
            assert page.eval(f"{job_row}.querySelector('.state').textContent") == "running"
            page.wait_for("document.getElementById('loss-chart').dataset.points === '5'", 30)
            curve = page.eval("Chart.getChart('loss-chart').data.datasets[0].data.map(p => p.y)")
            assert curve == losses
            assert page.eval("window.__errors") == []

            shot = page.screenshot(tmp_path / "status-page.png")
            assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def test_summary_counts_what_selection_exports(api, worker_factory) -> None:
    items = load_pool(4, start=300, max_chars=150, candidates=3)
    ds = create(api)
    api.post(f"/v1/datasets/{ds}/items", json={"items": items})
    assert api.get(f"/v1/datasets/{ds}/summary").json()["scored_items"] == 0
    worker_factory()
    wait_done(api, ds)

    summary = api.get(f"/v1/datasets/{ds}/summary").json()
    selection = [orjson.loads(x) for x in api.get(f"/v1/datasets/{ds}/selection").text.splitlines() if x]
    wins = Counter(r["source"] for r in selection)
    assert summary["scored_items"] == 4
    assert {s["source"]: s["wins"] for s in summary["sources"] if s["wins"]} == dict(wins)
    assert [s["wins"] for s in summary["sources"]] == sorted((s["wins"] for s in summary["sources"]), reverse=True)
    assert sum(s["candidates"] for s in summary["sources"]) == 12
    for s in summary["sources"]:
        assert s["candidates"] == s["items"]  # a source answers an instruction at most once in this pool
        assert s["win_rate"] == pytest.approx(s["wins"] / s["items"])
    hist = summary["histogram"]
    assert len(hist["edges"]) == len(hist["all"]) + 1 == len(hist["selected"]) + 1
    assert sum(hist["all"]) == 12 and sum(hist["selected"]) == 4
    assert all(a >= s for a, s in zip(hist["all"], hist["selected"], strict=True))
    assert min(r["score"] for r in selection) >= hist["edges"][0] - 1e-9
    assert api.get("/v1/datasets/ds-nope/summary").status_code == 404
    assert api.get(f"/v1/datasets/{ds}/summary", params={"reduce": "sum"}).json()["reduce"] == "sum"
