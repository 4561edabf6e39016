"""Experiments through the HTTP API, end to end on CPU: a real gateway process (uvicorn), a real `grape trainer`
and a real `grape evaluator` process, the bundled SmolLM2, a pool scored by a real worker, and the tiny
offline lm-eval task of tests/data/eval_tasks. Also: the evaluator killed in the middle of an evaluation
and the gateway restarted in the middle of training (the experiment still completes), the refusals that
come before anything trains, and cancel."""

from __future__ import annotations

import contextlib
import os
import re
import signal
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

from grape.experiments import format_table
from grape.keys import Keys
from tests.conftest import MODEL, ROOT, load_pool, start_gateway
from workers.loop import Worker

TASK = "grape_tiny_mc"
TASK_DIR = ROOT / "tests" / "data" / "eval_tasks"
SOURCE = "alpaca-7b"  # missing from two of the six items: source:alpaca-7b serves four instructions
HP = {"max_steps": 2, "learning_rate": 3e-3, "per_device_train_batch_size": 4, "max_length": 256}
HP |= {"gradient_checkpointing": False, "bf16": False}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


class Stack:
    """A gateway process, a trainer and an evaluator process on one key prefix, and a scored dataset."""

    def __init__(self, redis_url: str, keys: Keys, tmp: Path) -> None:
        self.redis_url, self.keys, self.tmp = redis_url, keys, tmp
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "GRAPE_KEY_PREFIX": keys.prefix,
            "GRAPE_TRAIN_DIR": str(tmp / "train"),
            "GRAPE_TRAINER_HEARTBEAT_S": "5",
            "GRAPE_EVAL_TASK_DIR": str(TASK_DIR),
            "GRAPE_EVAL_DEVICE": "cpu",
            "GRAPE_EVALUATOR_HEARTBEAT_S": "3",
            "GRAPE_EXPERIMENT_POLL_S": "0.5",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.gateway: subprocess.Popen | None = None
        self.url = ""
        self.http: httpx.Client | None = None
        self.ds = ""

    def start_gateway(self) -> None:
        self.gateway, self.url = start_gateway(self.redis_url, self.keys, GRAPE_EXPERIMENT_POLL_S="0.5")
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def stop_gateway(self) -> None:
        assert self.gateway is not None
        self.gateway.kill()
        self.gateway.wait(timeout=30)

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the process writes to it until it ends
        proc = subprocess.Popen(
            [sys.executable, "-m", "grape.cli", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-4000:]

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if not name.startswith("dead-"):
                assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{self.log(name)}"

    def get(self, path: str) -> Any:
        assert self.http is not None
        r = self.http.get(path)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, body: Any = None) -> httpx.Response:
        assert self.http is not None
        return self.http.post(path, json=body)

    def wait(self, cond: Any, what: str, timeout: float = 600) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = cond()
            if got:
                return got
            self.check_alive()
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def wait_experiment(self, exp_id: str, timeout: float = 600) -> dict[str, Any]:
        done = ("succeeded", "failed", "cancelled")
        return self.wait(lambda: (e := self.get(f"/v1/experiments/{exp_id}"))["state"] in done and e, exp_id, timeout)


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def items_with_a_gap() -> list[dict]:
    items = load_pool(6, start=40, max_chars=200, candidates=3)
    assert all(c["source"] != "gpt4_1106_preview" for it in items for c in it["candidates"])
    for it in items[1:3]:
        it["candidates"] = [c for c in it["candidates"] if c["source"] != SOURCE]
    assert sum(any(c["source"] == SOURCE for c in it["candidates"]) for it in items) == 4
    return items


@pytest.fixture(scope="module")
def stack(redis_url: str, hf_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys = Keys(f"grape-test-{uuid.uuid4().hex[:8]}")
    s = Stack(redis_url, keys, tmp_path_factory.mktemp("experiments"))
    rclient = redis.Redis.from_url(redis_url)
    try:
        s.spawn("evaluator", "evaluator")  # starts first: lm-eval takes a while to import
        s.spawn("trainer", "trainer", "--launcher", "inline")
        s.start_gateway()
        r = s.post("/v1/datasets", {"name": "experiments", "target_model": MODEL})
        assert r.status_code == 201, r.text
        s.ds = r.json()["id"]
        assert s.post(f"/v1/datasets/{s.ds}/items", {"items": items_with_a_gap()}).json()["accepted"] == 6
        worker = Worker(rclient, keys, MODEL, hf_backend, block_ms=200)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        s.wait(lambda: s.get(f"/v1/datasets/{s.ds}")["state"] == "done", "scoring", 300)
        worker.stop()  # no worker from now on: a new dataset stays queued (the 409 case)
        thread.join(timeout=60)
        s.wait(lambda: rclient.scard(keys.eval_tasks()) > 0, "the evaluator to publish its tasks", 180)
        yield s
    finally:
        for proc in [*s.procs.values(), *([s.gateway] if s.gateway else [])]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*s.procs.values(), *([s.gateway] if s.gateway else [])]:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        stale = list(rclient.scan_iter(match=f"{keys.prefix}:*", count=1000))
        if stale:
            rclient.delete(*stale)


def body(ds: str, arms: list[dict], pairs: int = 3, **kw: Any) -> dict[str, Any]:
    out = {
        "dataset_id": ds,
        "arms": arms,
        "budget": {"pairs": pairs},
        "hyperparameters": HP,
        "lora": LORA,
        "evaluation": {"tasks": [TASK]},
        "include_base": True,
    }
    return out | kw


def test_refused_before_anything_trains(stack: Stack) -> None:
    ds = stack.ds

    def refused(b: dict[str, Any], status: int, *needles: str) -> str:
        r = stack.post("/v1/experiments", b)
        assert r.status_code == status, r.text
        text = r.text
        for n in needles:
            assert n in text, f"{n!r} not in {text}"
        return text

    refused(body("ds-000000000000", [{"strategy": "grape"}]), 404, "dataset")
    refused(body(ds, [{"strategy": "grape"}, {"strategy": "graep"}]), 422, "arms[1].strategy", "grape")
    refused(body(ds, [{"strategy": "grape"}], evaluation={"tasks": ["grape_tiny_nope"]}), 422, "tasks", "grape_tiny")
    refused(body(ds, []), 422, "arms")
    refused(body(ds, [{"strategy": "grape"}, {"strategy": "random"}, {"strategy": "grape"}]), 422, "arms[2]", "arms[0]")
    # the budget is larger than what source:alpaca-7b can serve (four instructions): the arm and its size
    text = refused(body(ds, [{"strategy": "grape"}, {"strategy": f"source:{SOURCE}"}], pairs=5), 422, "arms[1]")
    assert f"source:{SOURCE}" in text and " 4 " in text
    # a pool-wide strategy keeps one pair per instruction (k=1): six pairs at most
    text = refused(body(ds, [{"strategy": "longest"}], pairs=7), 422, "arms[0] (longest)", " 6 pairs")
    refused(body(ds, [{"strategy": "grape", "n": 3}]), 422, "arms[0].n")
    refused(body(ds, [{"strategy": "grape", "k": 2}]), 422, "k")
    refused(body(ds, [{"strategy": "grape"}], budget={"pairs": 0}), 422, "pairs")
    # seeds a training job could not take are refused here, not in the driver after creation
    refused(body(ds, [{"strategy": "random", "seed": 2**32}]), 422, "seed")
    refused(body(ds, [{"strategy": "random", "seed": -1}]), 422, "seed")
    # an evaluation the evaluations API would refuse is refused here too (one set of checks)
    refused(body(ds, [{"strategy": "grape"}], evaluation={"tasks": ["grape_tiny_mc\n"]}), 422, "tasks")
    refused(body(ds, [{"strategy": "grape"}], evaluation={"tasks": ["grape_tiny_mc"], "batch_size": 0}), 422)
    # a dataset still scoring (no worker runs now)
    r = stack.post("/v1/datasets", {"name": "still scoring", "target_model": MODEL})
    other = r.json()["id"]
    stack.post(f"/v1/datasets/{other}/items", {"items": load_pool(1, start=60, max_chars=100, candidates=2)})
    refused(body(other, [{"strategy": "grape"}], pairs=1), 409, "dataset_id", "scoring")
    # nothing was queued by any of these
    assert stack.get("/v1/training-jobs")["jobs"] == []
    assert stack.get("/v1/experiments")["experiments"] == []


def test_whole_experiment_with_the_cli(stack: Stack) -> None:
    """`grape experiment … --wait` against the gateway: 2 arms + the base, 3 pairs each, 2 LoRA steps."""
    cmd = [sys.executable, "-m", "grape.cli", "experiment", stack.ds, "--arms", f"grape,source:{SOURCE}"]
    cmd += ["--pairs", "3", "--tasks", TASK, "--max-steps", "2", "--lr", "3e-3", "--batch-size", "4"]
    cmd += ["--max-length", "256", "--lora-r", "8", "--hp", "gradient_checkpointing=false", "--hp", "bf16=false"]
    cmd += ["--wait", "--interval", "0.5", "--url", stack.url]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=stack.env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr + stack.log("trainer") + stack.log("evaluator")
    exp_id = re.search(r"experiment (exp-[0-9a-f]{12}) queued", proc.stderr).group(1)
    exp = stack.get(f"/v1/experiments/{exp_id}")
    assert exp["state"] == "succeeded", exp

    # fair by construction: both arms trained on the same three instructions, drawn from the four that
    # source:alpaca-7b can serve; only the responses differ
    sel = [stack.http.get(f"/v1/experiments/{exp_id}/arms/{i}/selection").text.splitlines() for i in (0, 1)]
    sel = [[orjson.loads(x) for x in s] for s in sel]
    ids = [[r["id"] for r in s] for s in sel]
    assert len(ids[0]) == 3 and ids[0] == ids[1]
    assert all(r["source"] == SOURCE for r in sel[1])
    grape_pick = {r["id"]: r["candidate"] for r in stack.http.get(f"/v1/datasets/{stack.ds}/selection").iter_lines()
                  for r in [orjson.loads(r)] if r}  # fmt: skip
    assert all(grape_pick[r["id"]] == r["candidate"] for r in sel[0])
    assert exp["instructions"] == 4

    base = exp["base"]["results"][TASK]["acc"]
    assert 0 <= base["value"] <= 1 and base["stderr"] > 0
    for i, arm in enumerate(exp["arms"]):
        assert arm["state"] == "succeeded" and arm["job_state"] == "succeeded" and arm["eval_state"] == "succeeded"
        assert arm["selected_pairs"] == arm["pairs_trained"] == 3
        assert arm["tokens_trained"] > 0 and arm["final_loss"] > 0 and arm["max_steps"] == 2
        acc = arm["results"][TASK]["acc"]
        assert 0 <= acc["value"] <= 1 and acc["stderr"] > 0
        assert acc["delta_base"] == pytest.approx(acc["value"] - base["value"])
        job = stack.get(f"/v1/training-jobs/{arm['job_id']}")
        assert job["spec"]["selection_ref"] == f"{exp_id}/{i}" and job["spec"]["lora"]["r"] == 8
        ev = stack.get(f"/v1/evaluations/{arm['eval_id']}")
        assert ev["model"] == arm["job_id"] and ev["experiment_id"] == exp_id
    best = exp["best"][TASK]
    values = [a["results"][TASK]["acc"]["value"] for a in exp["arms"]]
    assert best["metric"] == "acc" and best["value"] == max(values) and best["arm"] == values.index(max(values))
    assert {"lm_eval", "transformers", "trl"} <= set(exp["versions"]), exp["versions"]
    assert [e["id"] for e in stack.get("/v1/experiments")["experiments"]] == [exp_id]

    # the printed table: the base model first, one row per arm, the best value of the column starred
    out = proc.stdout.splitlines()
    rows = [line for line in out if line.startswith(("base", "grape", "source:"))]
    assert [r.split()[0] for r in rows] == ["base", "grape", f"source:{SOURCE}"], proc.stdout
    assert f"{base['value']:.4f} ± {base['stderr']:.4f}" in rows[0]
    column = [base["value"], *values]
    starred = [r for r in rows if re.search(r"\d\*", r)]
    assert starred and all(f"{max(column):.4f}" in r for r in starred)
    assert format_table(exp) in proc.stdout
    print(f"\nexperiment (2 arms + base, CLI) took {elapsed:.0f} s\n{format_table(exp)}")


def test_experiment_survives_evaluator_kill_and_gateway_restart(stack: Stack) -> None:
    r = stack.post("/v1/experiments", body(stack.ds, [{"strategy": "random", "seed": 3}], pairs=2))
    assert r.status_code == 201, r.text
    exp_id = r.json()["id"]
    assert r.json()["state"] == "queued"
    # the gateway dies while the arm trains; a new one takes the experiment up from Redis
    exp = stack.wait(lambda: (e := stack.get(f"/v1/experiments/{exp_id}"))["state"] == "training" and e, "training")
    stack.stop_gateway()
    stack.start_gateway()
    # the base model's evaluation starts at once; the evaluator is killed while it runs
    base_eval = stack.wait(lambda: stack.get(f"/v1/experiments/{exp_id}")["base"].get("eval_id"), "base evaluation")
    stack.wait(lambda: stack.get(f"/v1/evaluations/{base_eval}")["state"] == "running", "the evaluation to run")
    killed = stack.procs.pop("evaluator")
    doomed = [killed.pid, *children(killed.pid)]  # the evaluator and its lm-eval process, as when a machine dies
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    killed.wait(timeout=30)
    stack.procs["dead-evaluator"] = killed
    stack.spawn("evaluator", "evaluator")
    exp = stack.wait_experiment(exp_id)
    assert exp["state"] == "succeeded", exp
    ev = stack.get(f"/v1/evaluations/{base_eval}")
    assert ev["state"] == "succeeded" and ev["attempts"] == 2, ev
    arm = exp["arms"][0]
    assert arm["state"] == "succeeded" and arm["results"][TASK]["acc"]["stderr"] > 0
    assert exp["base"]["results"][TASK]["acc"]["stderr"] > 0


def test_cancel_stops_what_has_not_finished(stack: Stack) -> None:
    trainer = stack.procs.pop("trainer")  # no trainer: the jobs stay queued (a running job's cancel is the
    trainer.terminate()  # training API's own business, tested there); the base evaluation runs or waits
    trainer.wait(timeout=120)
    r = stack.post("/v1/experiments", body(stack.ds, [{"strategy": "grape"}, {"strategy": "longest"}], pairs=2))
    assert r.status_code == 201, r.text
    exp_id = r.json()["id"]
    exp = stack.post(f"/v1/experiments/{exp_id}/cancel").json()
    assert exp["state"] == "cancelled"
    assert all(a["state"] == "cancelled" for a in exp["arms"])
    for arm in exp["arms"]:
        assert stack.get(f"/v1/training-jobs/{arm['job_id']}")["state"] == "cancelled"
    base_eval = exp["base"].get("eval_id")
    if base_eval:
        stack.wait(lambda: stack.get(f"/v1/evaluations/{base_eval}")["state"] == "cancelled", "eval cancelled", 60)
    assert stack.post(f"/v1/experiments/{exp_id}/cancel").status_code == 409
    assert stack.http.get("/v1/experiments/exp-000000000000").status_code == 404
    assert stack.http.get(f"/v1/experiments/{exp_id}/arms/5/selection").status_code == 404
