"""Evaluations through the HTTP API, run by real `grape evaluator` processes on lm-evaluation-harness with the
bundled SmolLM2 and a dozen-question offline lm-eval task (tests/data/eval_tasks, GRAPE_EVAL_TASK_DIR).
Real Redis, real gateway app, real evaluator processes, real lm-eval."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from grape.evaluations import EvalSpec, new_evaluation_fields
from grape.jobs import JobSpec, new_job_fields
from grape.keys import Keys
from grape.settings import Settings
from grape.store.io import call
from grape.store.jobqueue import EVALUATIONS
from service.app import create_app
from tests.conftest import MODEL, ROOT, start_gateway

TASK_DIR = ROOT / "tests" / "data" / "eval_tasks"
TASK = "grape_tiny_mc"
MISSING = "grape_tiny_missing"
LIMIT = 8
TERMINAL = ("succeeded", "failed", "cancelled")


def start_evaluator(redis_url: str, keys: Keys, name: str, log: Path, **env: str) -> subprocess.Popen:
    """`grape evaluator` in its own process, default settings but for the task directory and the device."""
    full = {
        **os.environ,
        "REDIS_URL": redis_url,
        "GRAPE_KEY_PREFIX": keys.prefix,
        "GRAPE_EVAL_TASK_DIR": str(TASK_DIR),
        "GRAPE_EVAL_DEVICE": "cpu",
        **env,
    }
    cmd = [sys.executable, "-m", "grape.cli", "evaluator", "--name", name]
    return subprocess.Popen(cmd, env=full, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), cwd=ROOT)


def wait_alive(rclient: redis.Redis, keys: Keys, name: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while not rclient.exists(keys.evaluations.holder(name)):
        if proc.poll() is not None:
            raise RuntimeError(f"evaluator {name} exited: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"evaluator {name} did not start: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_eval(api: TestClient, eval_id: str, states: tuple[str, ...] = TERMINAL, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = api.get(f"/v1/evaluations/{eval_id}")
        assert r.status_code == 200, r.text
        ev = r.json()
        if ev["state"] in states:
            return ev
        if time.monotonic() > deadline:
            raise TimeoutError(ev)
        time.sleep(0.1)


def children_of(eval_id: str) -> list[int]:
    """Processes running lm-eval for this evaluation (their command line names its spec file)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"evaluator.run" in cmd and f"grape-{eval_id}-".encode() in cmd:
            pids.append(int(proc.name))
    return pids


def client_of(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), base_url="http://localhost")


@pytest.fixture
def gw(settings: Settings) -> Iterator[TestClient]:
    """The real gateway app on this test's key prefix."""
    with client_of(settings) as client:
        yield client


@pytest.fixture(scope="module")
def shared(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One evaluator for the tests that only need a live one (its start indexes lm-eval's ~15,000 tasks)."""
    keys = Keys(f"grape-test-{uuid.uuid4().hex[:8]}")
    rclient = redis.Redis.from_url(redis_url)
    log = tmp_path_factory.mktemp("evaluator") / "shared.log"
    proc = start_evaluator(redis_url, keys, "shared", log)
    try:
        wait_alive(rclient, keys, "shared", proc, log)
        yield {"keys": keys, "settings": Settings(redis_url=redis_url, key_prefix=keys.prefix), "log": log}
    finally:
        stop(proc)
        stale = list(rclient.scan_iter(match=f"{keys.prefix}:*", count=1000))
        if stale:
            rclient.delete(*stale)


def test_refused_at_creation_naming_the_field(shared, settings, rclient) -> None:
    body = {"model": MODEL, "tasks": [TASK]}
    with client_of(settings) as api:  # a prefix of its own: no evaluator has ever run there
        r = api.post("/v1/evaluations", json=body)
        assert r.status_code == 503, r.text
        assert "grape evaluator" in r.json()["detail"]

    with client_of(shared["settings"]) as api:
        r = api.post("/v1/evaluations", json={**body, "tasks": [TASK, "grape_tiny_mcq"]})
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith("tasks: 'grape_tiny_mcq' not known")
        assert r.json()["unknown"] == ["grape_tiny_mcq"] and TASK in r.json()["near"]
        # lm-eval's own tasks are not offered unless the operator allows them (GRAPE_EVAL_TASKS, issue 19),
        # and a path is never a task name
        assert not rclient.sismember(shared["keys"].eval_tasks(), "hellaswag")
        assert api.post("/v1/evaluations", json={**body, "tasks": ["../../etc/x.yaml"]}).status_code == 422

        for bad, field in (
            ({**body, "tasks": []}, "tasks"),
            ({**body, "tasks": [TASK, TASK]}, "tasks"),
            ({**body, "limit": 0}, "limit"),
            ({**body, "num_fewshot": -1}, "num_fewshot"),
            ({**body, "batch_size": 0}, "batch_size"),
            ({**body, "model": "job-1"}, "model"),
            ({**body, "device": "cuda"}, "device"),
        ):
            r = api.post("/v1/evaluations", json=bad)
            assert r.status_code == 422, (bad, r.text)
            assert field in {str(p) for e in r.json()["detail"] for p in e["loc"]}, r.text

        r = api.post("/v1/evaluations", json={**body, "model": "someone/else"})  # GRAPE_ALLOWED_MODELS
        assert r.status_code == 422 and r.json()["field"] == "model", r.text
        assert "GRAPE_ALLOWED_MODELS" in r.json()["detail"]

        job_id = f"job-{uuid.uuid4().hex[:12]}"
        r = api.post("/v1/evaluations", json={**body, "model": job_id})
        assert r.status_code == 422 and r.json()["detail"] == f"model: training job {job_id} not found", r.text
        spec = JobSpec(dataset_id="ds-000000000000", base_model=MODEL)
        rclient.hset(shared["keys"].training.record(job_id), mapping=new_job_fields(job_id, spec, time.time()))
        r = api.post("/v1/evaluations", json={**body, "model": job_id})
        assert r.status_code == 409 and r.json()["detail"].startswith(f"model: training job {job_id} is queued")

        # a succeeded LoRA job: its adapter is evaluated on its base model (cancelled at once: no adapter here)
        lora_job = f"job-{uuid.uuid4().hex[:12]}"
        spec = JobSpec(dataset_id="ds-000000000000", base_model=MODEL, lora={"r": 4})
        fields = {**new_job_fields(lora_job, spec, time.time()), "state": "succeeded", "model_path": "/x/adapter"}
        rclient.hset(shared["keys"].training.record(lora_job), mapping=fields)
        r = api.post("/v1/evaluations", json={**body, "model": lora_job})
        assert r.status_code == 201, r.text
        assert api.post(f"/v1/evaluations/{r.json()['id']}/cancel").status_code == 202
        ev = api.get(f"/v1/evaluations/{r.json()['id']}").json()
        assert (ev["model"], ev["base_model"], ev["adapter"], ev["training_job"]) == (
            lora_job,
            MODEL,
            "/x/adapter",
            lora_job,
        )

        assert api.get("/v1/evaluations/ev-000000000000").status_code == 404
        assert api.get("/v1/evaluations/ev-nonsense:x").status_code == 404
        assert api.post("/v1/evaluations/ev-000000000000/cancel").status_code == 404


def test_base_model_metrics_equal_lm_eval_simple_evaluate(shared, redis_url, model_path, monkeypatch) -> None:
    """`grape eval --wait` through a real gateway; its metrics are lm-eval's own, to the last bit."""
    gateway, url = start_gateway(redis_url, shared["keys"])
    try:
        cmd = [sys.executable, "-m", "grape.cli", "eval", MODEL, "--tasks", TASK, "--limit", str(LIMIT), "--wait"]
        out = subprocess.run(cmd + ["--url", url], capture_output=True, text=True, timeout=600, cwd=ROOT)
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
    assert out.returncode == 0, out.stderr
    eval_id = out.stderr.split("evaluation ")[1].split()[0]

    with client_of(shared["settings"]) as api:
        ev = api.get(f"/v1/evaluations/{eval_id}").json()
    assert ev["state"] == "succeeded" and ev["attempts"] == 1 and ev["evaluator"] == "shared"
    assert ev["model"] == MODEL and ev["tasks"] == [TASK] and ev["limit"] == LIMIT and ev["batch_size"] == 8
    assert {"lm_eval", "transformers", "torch"} <= set(ev["versions"])
    assert ev["done_requests"] == ev["total_requests"] == LIMIT * 4  # 4 choices per question

    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(TASK_DIR)  # the evaluator runs lm-eval there: relative data_files
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": model_path, "dtype": "float32"},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        device="cpu",
        limit=LIMIT,
        batch_size=8,
        log_samples=False,
    )
    raw = direct["results"][TASK]
    assert set(ev["results"]) == {TASK}
    assert ev["results"][TASK] == {
        "acc": {"value": raw["acc,none"], "stderr": raw["acc_stderr,none"]},
        "acc_norm": {"value": raw["acc_norm,none"], "stderr": raw["acc_norm_stderr,none"]},
    }
    assert ev["higher_is_better"] == {TASK: {"acc": True, "acc_norm": True}}
    assert ev["n_samples"] == {TASK: {"original": 12, "effective": LIMIT}}
    # the table the command printed: one row per metric, lm-eval's values
    rows = [line.split() for line in out.stdout.splitlines()]
    assert ["grape_tiny_mc", "acc", f"{raw['acc,none']:.4f}", f"{raw['acc_stderr,none']:.4f}"] in rows

    # the data of a task that cannot be loaded: the evaluation fails with lm-eval's own reason
    with pytest.raises(Exception) as lm_eval_error:
        lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": model_path, "dtype": "float32"},
            tasks=[MISSING],
            task_manager=TaskManager(include_path=str(TASK_DIR)),
            device="cpu",
            log_samples=False,
        )
    shared["missing_reason"] = f"{type(lm_eval_error.value).__name__}: {lm_eval_error.value}"


def test_task_data_that_cannot_load_fails_with_lm_eval_reason(shared) -> None:
    with client_of(shared["settings"]) as api:
        r = api.post("/v1/evaluations", json={"model": MODEL, "tasks": [MISSING]})
        assert r.status_code == 201, r.text
        ev = wait_eval(api, r.json()["id"])
        logs = [orjson.loads(line) for line in api.get(f"/v1/evaluations/{ev['id']}/logs").text.splitlines()]
    assert ev["state"] == "failed" and ev["results"] is None and ev["attempts"] == 1, ev
    assert ev["error"].startswith("FileNotFoundError: ") and "no_such_file.jsonl" in ev["error"], ev["error"]
    if "missing_reason" in shared:  # the same words lm-eval raised when the test called it directly
        assert ev["error"] == shared["missing_reason"]
    assert logs[-1]["level"] == "error" and logs[-1]["msg"] == f"failed: {ev['error']}"


def test_killed_evaluator_evaluation_taken_over_by_another(gw, redis_url, keys, rclient, tmp_path) -> None:
    """SIGKILL an evaluator while lm-eval scores requests: its child dies with it, the evaluation is queued
    again once its heartbeat expires (default settings), a second evaluator runs it to the end."""
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_evaluator(redis_url, keys, "doomed", log_a)
    b = None
    try:
        wait_alive(rclient, keys, "doomed", a, log_a)
        r = gw.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK], "limit": LIMIT, "batch_size": 1})
        assert r.status_code == 201, r.text
        eval_id = r.json()["id"]
        ev = wait_eval(gw, eval_id, ("running",), timeout=60)
        assert ev["evaluator"] == "doomed"
        b = start_evaluator(redis_url, keys, "heir", log_b)
        deadline = time.monotonic() + 300
        while rclient.hget(keys.evaluations.record(eval_id), "done_requests") is None:  # lm-eval is scoring
            assert time.monotonic() < deadline and a.poll() is None, log_a.read_text()[-3000:]
            time.sleep(0.05)
        a.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        a.wait()
        while children_of(eval_id):  # the lm-eval child dies with its evaluator (PR_SET_PDEATHSIG)
            assert time.monotonic() - killed < 5, "the dead evaluator's lm-eval process lives on"
            time.sleep(0.1)
        assert gw.get(f"/v1/evaluations/{eval_id}").json()["state"] == "running"  # until the heartbeat expires

        wait_alive(rclient, keys, "heir", b, log_b)
        while True:  # the heir's own reaping (not a read through the gateway) must requeue it
            held = [
                x.decode() if x else x for x in rclient.hmget(keys.evaluations.record(eval_id), "state", "evaluator")
            ]
            if held[0] in TERMINAL or held == ["running", "heir"]:
                break
            assert time.monotonic() - killed < 60, f"not taken over within a minute of the kill: {held}"
            time.sleep(0.2)
        taken_over = time.monotonic() - killed
        ev = wait_eval(gw, eval_id, timeout=300)
        done = time.monotonic() - killed
        logs = [orjson.loads(line)["msg"] for line in gw.get(f"/v1/evaluations/{eval_id}/logs").text.splitlines()]
    finally:
        for p in (a, b):
            if p is not None:
                stop(p)
    print(f"kill -> taken over {taken_over:.1f} s, -> succeeded {done:.1f} s")
    assert ev["state"] == "succeeded", ev
    assert ev["evaluator"] == "heir" and ev["attempts"] == 2
    assert set(ev["results"][TASK]) == {"acc", "acc_norm"}
    assert any(m.startswith("evaluator doomed stopped sending heartbeats") and "queued again" in m for m in logs)
    assert "started on evaluator heir (attempt 2)" in logs


def test_cancel_and_sigterm_hand_back(gw, redis_url, keys, rclient, tmp_path) -> None:
    log = tmp_path / "e.log"
    proc = start_evaluator(redis_url, keys, "e1", log)
    try:
        wait_alive(rclient, keys, "e1", proc, log)
        body = {"model": MODEL, "tasks": [TASK]}
        first = gw.post("/v1/evaluations", json=body).json()["id"]
        wait_eval(gw, first, ("running",), timeout=60)
        while not children_of(first):
            time.sleep(0.05)
        r = gw.post(f"/v1/evaluations/{first}/cancel")
        assert r.status_code == 202 and r.json()["cancel_requested"], r.text
        ev = wait_eval(gw, first, timeout=30)
        assert ev["state"] == "cancelled" and not children_of(first), ev
        assert gw.post(f"/v1/evaluations/{first}/cancel").status_code == 409

        second = gw.post("/v1/evaluations", json=body).json()["id"]
        wait_eval(gw, second, ("running",), timeout=60)
        while not children_of(second):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # shutting down: the evaluation goes back to the queue, not failed
        assert proc.wait(timeout=60) == 0
        ev = gw.get(f"/v1/evaluations/{second}").json()
        assert ev["state"] == "queued" and ev["attempts"] == 0, ev  # a hand-back is not an attempt
        assert not children_of(second) and not rclient.exists(keys.evaluations.holder("e1"))
        assert rclient.lrange(keys.evaluations.queue(), 0, -1) == [second.encode()]

        third = gw.post("/v1/evaluations", json=body)  # no evaluator left
        assert third.status_code == 503, third.text
        r = gw.post(f"/v1/evaluations/{second}/cancel")  # queued: cancelled at once
        assert r.status_code == 202 and r.json()["state"] == "cancelled"
        assert rclient.llen(keys.evaluations.queue()) == 0
        listed = gw.get("/v1/evaluations").json()["evaluations"]
        assert [e["id"] for e in listed] == [second, first]
    finally:
        stop(proc)


def test_dead_evaluator_fails_the_evaluation_after_max_attempts(gw, keys, rclient) -> None:
    """Reaping by the gateway when the evaluation is read: queued again while attempts remain, then failed."""
    spec = EvalSpec(model=MODEL, tasks=[TASK], base_model=MODEL)
    eval_id = f"ev-{uuid.uuid4().hex[:12]}"
    fields = new_evaluation_fields(eval_id, spec, time.time(), max_attempts=2)
    assert call(rclient, EVALUATIONS.enqueue(keys, eval_id, fields, 100))
    for attempt, expected in ((1, "queued"), (2, "failed")):
        # an evaluator "ghost" takes it, as the loop does, and dies without a heartbeat
        assert (
            rclient.lmove(keys.evaluations.queue(), keys.evaluations.claimed("ghost"), "RIGHT", "LEFT")
            == eval_id.encode()
        )
        call(rclient, EVALUATIONS.start(keys, eval_id, "ghost"))
        ev = gw.get(f"/v1/evaluations/{eval_id}").json()
        assert ev["state"] == expected and ev["attempts"] == attempt, ev
    assert ev["error"] == "evaluator ghost stopped sending heartbeats (process died or lost Redis) (attempt 2 of 2)"
    assert rclient.llen(keys.evaluations.queue()) == 0 and rclient.llen(keys.evaluations.claimed("ghost")) == 0


def test_lm_eval_model_args_of_a_lora_job(model_path, tmp_path) -> None:
    """A LoRA adapter goes on its base model: lm-eval's `peft=` (hf) or `lora_local_path` (vllm)."""
    from evaluator.harness import model_args

    adapter = tmp_path / "adapter"
    spec = EvalSpec(model="job-0123456789ab", tasks=[TASK], base_model=MODEL, adapter=str(adapter))
    with pytest.raises(FileNotFoundError, match="is not on this evaluator"):
        model_args(spec, backend="hf", dtype="float32")
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    assert model_args(spec, backend="hf", dtype="float32") == {
        "pretrained": model_path,
        "dtype": "float32",
        "peft": str(adapter),
    }
    vllm = model_args(spec, backend="vllm", dtype="bfloat16")
    assert vllm == {"pretrained": model_path, "dtype": "bfloat16", "lora_local_path": str(adapter), "max_lora_rank": 8}
    plain = EvalSpec(model=MODEL, tasks=[TASK], base_model=MODEL)
    assert model_args(plain, backend="hf", dtype="float32") == {"pretrained": model_path, "dtype": "float32"}
