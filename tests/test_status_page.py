"""The status page in a real browser, and the summary endpoint it draws from.

Headless Chromium (Debian's `chromium`, installed by the test when missing, driven by Playwright for Python:
no browser download) opens the page served by a real gateway process while a real worker process scores a
dataset, sees the progress bar advance and the wins chart drawn, and saves a screenshot in the test's
temporary directory. A second test shows an experiment's arms and its chart (bars, error bars, base line).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from playwright.sync_api import Page, sync_playwright

from grape.redis_server import free_port
from grape.store.jobqueue import log_fields
from tests.conftest import MODEL, create, load_pool, wait_done
from tests.system_packages import ensure_binary

API_KEY = "status-page-key"


# Without the background-networking flags Chromium keeps calling Google's hosts, which this machine's closed
# network refuses; --no-sandbox because tests run as root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    return ensure_binary("chromium", "chromium")


@contextmanager
def browser_page(executable: str, width: int = 1280, height: int = 1100) -> Iterator[Page]:
    """A page of headless Debian Chromium; script errors are collected in `window.__errors`."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.add_init_script(
                "window.__errors = []; addEventListener('error', e => __errors.push(String(e.message)));"
            )
            yield page
        finally:
            browser.close()


def wait_js(page: Page, expression: str, seconds: float) -> None:
    page.wait_for_function(expression, timeout=seconds * 1000)


def painted(page: Page, canvas_id: str) -> int:
    """Pixels of the canvas that are not transparent: the chart was drawn, not only configured."""
    return page.evaluate(
        f"(() => {{ const c = document.getElementById('{canvas_id}');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; })()"
    )


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

        with browser_page(chromium) as page:
            page.goto(base + "/")
            # the gateway has keys: the page asks for one, as a person would type it
            wait_js(page, "!document.getElementById('key-form').hidden", 20)
            page.fill("#key-input", API_KEY)
            page.evaluate("document.getElementById('key-form').requestSubmit()")
            row = f"document.querySelector('tr[data-dataset=\"{ds}\"]')"
            wait_js(page, f"{row} !== null", 20)
            progress = f"{row}.querySelector('progress')"
            seen = [int(page.evaluate(f"{progress}.value"))]
            assert seen == [0] and int(page.evaluate(f"{progress}.max")) == total

            # now a worker starts scoring; the page, polling on its own, must show the bar moving
            spawn("worker", [sys.executable, "-m", "workers", "--model", MODEL, "--backend", "hf", "--read-count", "1",
                             "--commit-tokens", "256"])  # fmt: skip

            def progressed() -> bool:
                now = int(page.evaluate(f"{progress}.value"))
                if now != seen[-1]:
                    seen.append(now)
                return now == total

            _wait(progressed, 600, "the page to show every pair scored", procs)
            assert seen == sorted(seen) and len(seen) >= 3, f"progress seen by the page: {seen}"
            assert any(0 < v < total for v in seen)
            assert page.evaluate(f"{row}.querySelector('.state').textContent") == "done"
            # the live worker and what it scores with
            wait_js(page, "document.querySelector('#workers tr[data-worker]') !== null", 20)
            cells = page.evaluate(
                "[...document.querySelectorAll('#workers tr[data-worker] td')].map((c) => c.textContent)"
            )
            assert cells[1:5] == [MODEL, "logprob", "hf", "shared-prefix+response-rows-projection"], cells
            assert page.evaluate("document.getElementById('workers-section').hidden") is False

            # the wins chart: one bar per source, the bars add up to one win per instruction
            wait_js(page, "document.getElementById('wins-chart').dataset.wins === '6'", 30)
            chart = page.evaluate(
                "(() => { const c = Chart.getChart('wins-chart');"
                " return {labels: c.data.labels, data: c.data.datasets[0].data}; })()"
            )
            sources = {c["source"] for it in items for c in it["candidates"]}
            assert len(chart["labels"]) == len(sources) and sum(chart["data"]) == 6
            assert all(any(label.startswith(s) for s in sources) for label in chart["labels"])
            # and it is drawn: the canvas has painted pixels
            assert painted(page, "wins-chart") > 1000
            assert page.evaluate("Chart.getChart('hist-chart').data.datasets[0].data.reduce((a, b) => a + b, 0)") == 6
            # a training job on the selection, created through the API; its progress is written the way a
            # trainer writes it (heartbeat, job hash, log records with step and loss): no TRL run here
            r = http.post("/v1/training-jobs", json={"dataset_id": ds})
            assert r.status_code == 201, r.text
            job = r.json()["id"]
            losses = [2.41, 2.12, 1.93, 1.71, 1.62]
            rc = redis.Redis.from_url(redis_url)
            rc.set(keys.training.holder("page-trainer"), b"{}", ex=120)
            for step, loss in enumerate(losses, start=1):
                rc.xadd(keys.training.log(job), log_fields(f"step {step}: loss {loss}", step=step, loss=loss))
            rc.hset(
                keys.training.record(job),
                mapping={"state": "running", "trainer": "page-trainer", "step": "5", "max_steps": "10",
                         "loss": "1.62", "started": f"{time.time():.3f}"},
            )  # fmt: skip
            job_row = f"document.querySelector('tr[data-job=\"{job}\"]')"
            wait_js(page, f"{job_row} !== null && {job_row}.querySelector('progress') !== null", 30)
            assert page.evaluate(f"{job_row}.querySelector('progress').value") == 5
            assert page.evaluate(f"{job_row}.querySelector('.state').textContent") == "running"
            wait_js(page, "document.getElementById('loss-chart').dataset.points === '5'", 30)
            curve = page.evaluate("Chart.getChart('loss-chart').data.datasets[0].data.map(p => p.y)")
            assert curve == losses
            assert page.evaluate("window.__errors") == []

            shot = tmp_path / "status-page.png"
            page.screenshot(path=str(shot), full_page=True)
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


def finished_experiment(exp_id: str) -> dict:
    """A finished experiment record as the gateway stores it (2 arms + base, 2 tasks), validated against the
    API's own response model so the page is tested on the real shape."""
    from service.experiment_schemas import ExperimentPublic

    def res(a: float, sa: float, b: float, sb: float) -> dict:
        return {
            "grape_tiny_mc": {"acc": {"value": a, "stderr": sa}},
            "grape_tiny_qa": {"acc": {"value": b, "stderr": sb}},
        }

    base = res(0.40, 0.05, 0.30, 0.04)
    arms = []
    for i, (label, r) in enumerate([("grape", res(0.55, 0.06, 0.35, 0.05)), ("longest", res(0.45, 0.05, 0.42, 0.05))]):
        for task, metrics in r.items():
            metrics["acc"]["delta_base"] = metrics["acc"]["value"] - base[task]["acc"]["value"]
        arms.append(
            {"index": i, "label": label, "strategy": label, "per_instruction": label == "grape",
             "params": {"k": 1, "reduce": "mean", "n": None, "tau": 0.9, "seed": 0}, "selected_pairs": 200,
             "state": "succeeded", "job_id": f"job-00000000000{i}", "job_created": True, "job_state": "succeeded",
             "step": 25, "max_steps": 25, "pairs_trained": 200, "tokens_trained": 61234, "final_loss": 1.2 + i / 10,
             "eval_id": f"ev-00000000000{i}", "eval_state": "succeeded", "results": r}
        )  # fmt: skip
    best = {
        "grape_tiny_mc": {"metric": "acc", "arm": 0, "label": "grape", "value": 0.55, "stderr": 0.06},
        "grape_tiny_qa": {"metric": "acc", "arm": 1, "label": "longest", "value": 0.42, "stderr": 0.05},
    }
    rec = {
        "id": exp_id, "state": "succeeded", "dataset_id": "ds-000000000000", "base_model": MODEL,
        "created": time.time() - 600, "finished": time.time(), "budget": {"pairs": 200},
        "evaluation": {"tasks": ["grape_tiny_mc", "grape_tiny_qa"], "limit": None, "num_fewshot": None,
                       "batch_size": None},
        "include_base": True, "seed": 0, "hyperparameters": {"max_steps": 25}, "lora": {"r": 8}, "instructions": 403,
        "arms": arms,
        "base": {"model": MODEL, "eval_id": "ev-0000000000b0", "eval_state": "succeeded", "results": base},
        "best": best, "versions": {"lm_eval": "0.4.13", "trl": "1.16.0", "transformers": "5.19.0"},
    }  # fmt: skip
    ExperimentPublic.model_validate(rec)
    return rec


def test_status_page_shows_an_experiment_chart(chromium, live_gateway, redis_url, keys, tmp_path) -> None:
    exp_id = "exp-0123456789ab"
    rc = redis.Redis.from_url(redis_url)
    rc.set(keys.experiment(exp_id), orjson.dumps(finished_experiment(exp_id)))
    rc.zadd(keys.experiments(), {exp_id: time.time()})
    assert httpx.get(f"{live_gateway}/v1/experiments/{exp_id}").json()["state"] == "succeeded"

    with browser_page(chromium) as page:
        page.goto(live_gateway + "/")
        row = f"document.querySelector('tr[data-experiment=\"{exp_id}\"]')"
        wait_js(page, f"{row} !== null", 20)
        assert page.evaluate(f"{row}.querySelector('.state').textContent") == "succeeded"
        assert page.evaluate(f"{row}.querySelector('progress').value") == 5  # 2 arms x (train, eval) + base
        arms = page.evaluate(
            "[...document.querySelectorAll('#experiment-arms tbody tr')]"
            ".map(r => [r.dataset.arm, r.cells[0].textContent])"
        )
        assert [a[0] for a in arms] == ["base", "0", "1"]
        assert arms[1][1].startswith("grape") and arms[2][1].startswith("longest")
        results = page.evaluate("document.querySelector('#experiment-arms tr[data-arm=\"0\"] .results').textContent")
        assert "0.550 ± 0.060 (+0.150)" in results

        # the grouped bar chart: one group per task, one bar per arm, drawn with whiskers and base lines
        wait_js(page, "document.getElementById('experiment-chart').dataset.errorBars === '4'", 20)
        data = page.evaluate(
            "(() => { const c = Chart.getChart('experiment-chart'); return {labels: c.data.labels,"
            " sets: c.data.datasets.map(d => [d.label, d.data, d.errors]),"
            " base: c.options.plugins.errorBars.base}; })()"
        )
        assert data["labels"] == ["grape_tiny_mc (acc)", "grape_tiny_qa (acc)"]
        assert data["sets"] == [["grape", [0.55, 0.35], [0.06, 0.05]], ["longest", [0.45, 0.42], [0.05, 0.05]]]
        assert data["base"] == [0.40, 0.30]
        assert page.evaluate("document.getElementById('experiment-chart').dataset.baseLines") == "2"
        assert painted(page, "experiment-chart") > 1000
        # the base line is drawn where the base value is: a grey dashed pixel row at y(0.40) in the first group
        on_line = page.evaluate(
            "(() => { const c = Chart.getChart('experiment-chart');"
            " const y = Math.round(c.scales.y.getPixelForValue(0.4) * devicePixelRatio);"
            " const x0 = Math.round((c.scales.x.getPixelForValue(0) - 0.4 * c.scales.x.width / 2) * devicePixelRatio);"
            " const w = Math.round(0.8 * c.scales.x.width / 2 * devicePixelRatio);"
            " const d = c.ctx.getImageData(x0, y - 1, w, 3).data; let n = 0;"
            " for (let i = 0; i < d.length; i += 4) if (d[i] === 0x6a && d[i + 1] === 0x73 && d[i + 2] === 0x7d) n++;"
            " return n; })()"
        )
        assert on_line > 20, on_line
        assert page.evaluate("window.__errors") == []
        page.screenshot(path=str(tmp_path / "experiment.png"), full_page=True)
