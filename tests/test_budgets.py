"""Budgets per job (issue 19): what one training job or evaluation may ask for. Training: GRAPE_MAX_TRAIN_TOKENS
and GRAPE_MAX_TRAIN_SAVES at the gateway, for experiments before anything is stored, and again in the trainer;
checkpoints kept bounded (GRAPE_TRAIN_SAVE_TOTAL_LIMIT) on disk and in the job's record. Evaluations: the
GRAPE_EVAL_TASKS allow-list at the gateway and the evaluator, groups and unsafe code, near matches off the
event loop, echoed names cut to 64 characters. Real Redis, real model, real trainer, real evaluator processes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from grape.evaluations import EvalSpec, new_evaluation_fields
from grape.jobs import JobSpec, new_job_fields
from grape.keys import Keys
from grape.settings import Settings
from grape.store import eval_tasks
from grape.store.io import call
from grape.store.jobqueue import EVALUATIONS, TRAINING
from service.app import create_app
from tests.conftest import MODEL, start_gateway
from tests.test_evaluations import TASK, TASK_DIR, start_evaluator, stop, wait_alive
from tests.test_training import LORA, scored_dataset, wait_job

SMALL = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "save_steps": 1}
SMALL |= {"gradient_checkpointing": False, "bf16": False, "learning_rate": 1e-3}


@pytest.fixture
def settings(redis_url: str, keys: Keys) -> Settings:
    """The operator keeps 2 checkpoints per job here (GRAPE_TRAIN_SAVE_TOTAL_LIMIT); every other cap default."""
    return Settings(redis_url=redis_url, key_prefix=keys.prefix, chunk_pairs=16, train_save_total_limit=2)


def _job(api: TestClient, ds: str, **hp: Any) -> httpx.Response:
    return api.post("/v1/training-jobs", json={"dataset_id": ds, "base_model": MODEL, "hyperparameters": hp})


def _refused(r: httpx.Response, *needles: str) -> None:
    assert r.status_code == 422, r.text
    for n in needles:
        assert n in r.json()["detail"], (n, r.text)


# ---- training ------------------------------------------------------------------------------------------


def test_training_jobs_and_experiments_over_budget_are_refused_before_anything_is_stored(
    api, worker_factory, settings, rclient, keys
) -> None:
    ds = scored_dataset(api, worker_factory)  # 4 instructions, 3 candidates each

    # 10^6 steps x 8 x 1024 tokens = 8.2e9, past the default 5e9
    _refused(_job(api, ds, max_steps=1_000_000, save_steps=1), "GRAPE_MAX_TRAIN_TOKENS=5,000,000,000", "8,192,000,000")
    # ~10^12 sequences
    _refused(
        _job(api, ds, max_steps=1_000_000, per_device_train_batch_size=1024, gradient_accumulation_steps=1024),
        "GRAPE_MAX_TRAIN_TOKENS",
        f"{1_000_000 * 1024 * 1024 * 1024:,}",
    )
    # within the token budget, but a checkpoint per step of 10^6 steps
    _refused(
        _job(api, ds, max_steps=1_000_000, per_device_train_batch_size=1, max_length=8, save_steps=1),
        "GRAPE_MAX_TRAIN_SAVES=100",
        "1,000,000 checkpoints",
        "save_steps of at least 10000",
    )
    # a fraction: 1e-06 of 1000 steps is a save every step (transformers rounds up to 1)
    _refused(_job(api, ds, max_steps=1000, save_steps=1e-06), "GRAPE_MAX_TRAIN_SAVES", "1,000 checkpoints")
    _refused(_job(api, ds, max_steps=1000, save_steps=0.001), "GRAPE_MAX_TRAIN_SAVES")  # the same, 1 step
    assert _job(api, ds, max_steps=1000, save_steps=0.01).status_code == 201  # 100 checkpoints: at the cap

    # epochs count through the selection's size (4 instructions, k=1: at most 4 records, one step per epoch)
    tight = settings.model_copy(update={"max_train_tokens": 100 * 8 * 1024})
    with TestClient(create_app(tight)) as small:
        _refused(
            _job(small, ds, num_train_epochs=1000, save_steps=500),
            "1000 epochs over 4 records = 1000 steps",
            "GRAPE_MAX_TRAIN_TOKENS=819,200",
        )
        assert _job(small, ds, num_train_epochs=100, save_steps=500).status_code == 201  # 100 steps: at the cap
        # k=3 keeps up to 12 records: 2 steps per epoch
        r = small.post(
            "/v1/training-jobs",
            json={"dataset_id": ds, "base_model": MODEL, "k": 3, "hyperparameters": {"num_train_epochs": 60}},
        )
        _refused(r, "60 epochs over 12 records = 120 steps")

    jobs = api.get("/v1/training-jobs").json()["jobs"]
    assert len(jobs) == 2, jobs  # only the two accepted: nothing of a refused job was stored

    # an experiment: every arm is a job of these hyperparameters on budget.pairs records
    body = {
        "dataset_id": ds,
        "arms": [{"strategy": "random", "seed": s} for s in range(16)],
        "budget": {"pairs": 4},
        "hyperparameters": {
            "max_steps": 1_000_000,
            "per_device_train_batch_size": 1024,
            "gradient_accumulation_steps": 1024,
        },
        "evaluation": {"tasks": [TASK]},
    }
    _refused(api.post("/v1/experiments", json=body), "GRAPE_MAX_TRAIN_TOKENS")
    body["hyperparameters"] = {"num_train_epochs": 1000, "save_steps": 1}
    _refused(api.post("/v1/experiments", json=body), "GRAPE_MAX_TRAIN_SAVES", "1000 steps")
    assert api.get("/v1/experiments").json() in ([], {"experiments": []})
    assert not list(rclient.scan_iter(match=f"{keys.prefix}:exp*", count=1000))
    assert len(api.get("/v1/training-jobs").json()["jobs"]) == 2


def test_trainer_refuses_a_job_over_its_cap_and_keeps_checkpoints_bounded(
    api, worker_factory, trainer_factory, rclient, keys
) -> None:
    ds = scored_dataset(api, worker_factory)
    # a job that never went through the gateway (written by an older gateway, or straight into Redis)
    over = f"job-{uuid.uuid4().hex[:12]}"
    hp = {**SMALL, "max_steps": 1_000_000, "per_device_train_batch_size": 1024, "gradient_accumulation_steps": 1024}
    spec = JobSpec(dataset_id=ds, base_model=MODEL, hyperparameters=hp, lora=LORA)
    assert call(rclient, TRAINING.enqueue(keys, over, new_job_fields(over, spec, time.time()), 100))
    # a small job asking to keep more checkpoints than the operator's 2, one per step
    r = api.post(
        "/v1/training-jobs",
        json={
            "dataset_id": ds,
            "base_model": MODEL,
            "hyperparameters": {**SMALL, "max_steps": 4, "save_total_limit": 10},
            "lora": LORA,
        },
    )
    assert r.status_code == 201, r.text
    small = r.json()["id"]

    trainer_factory()
    st = wait_job(api, over, ("succeeded", "failed", "cancelled"), timeout=300)
    assert st["state"] == "failed", st
    assert "GRAPE_MAX_TRAIN_TOKENS" in st["error"] and "max_steps 1000000" in st["error"], st["error"]
    assert st["step"] == 0 and not st["checkpoints"]

    st = wait_job(api, small, ("succeeded", "failed", "cancelled"), timeout=600)
    assert st["state"] == "succeeded", st.get("error")
    assert [Path(c).name for c in st["checkpoints"]] == ["checkpoint-3", "checkpoint-4"]
    on_disk = sorted(p.name for p in Path(st["output_dir"]).glob("checkpoint-*"))
    assert on_disk == ["checkpoint-3", "checkpoint-4"]
    logs = api.get(f"/v1/training-jobs/{small}/logs").text
    assert logs.count("checkpoint saved") == 4  # saved every step, rotated to the newest 2


# ---- evaluations ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluator(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One `grape evaluator` with the operator's defaults (GRAPE_EVAL_TASKS unset) and the test task directory."""
    keys = Keys(f"grape-test-{uuid.uuid4().hex[:8]}")
    rclient = redis.Redis.from_url(redis_url)
    log = tmp_path_factory.mktemp("evaluator") / "budgets.log"
    proc = start_evaluator(redis_url, keys, "budgets", log)
    try:
        wait_alive(rclient, keys, "budgets", proc, log)
        yield {"keys": keys, "settings": Settings(redis_url=redis_url, key_prefix=keys.prefix), "log": log}
    finally:
        stop(proc)
        stale = list(rclient.scan_iter(match=f"{keys.prefix}:*", count=1000))
        if stale:
            rclient.delete(*stale)


def _client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), base_url="http://localhost")


def test_default_allow_list_is_the_task_directory_at_the_gateway_and_the_evaluator(evaluator, rclient) -> None:
    keys = evaluator["keys"]
    # the evaluator offers only its GRAPE_EVAL_TASK_DIR: lm-eval's own tasks are not even published
    assert {x.decode() for x in rclient.smembers(keys.eval_tasks())} == {TASK, "grape_tiny_missing"}
    with _client(evaluator["settings"]) as api:
        for tasks in (["humaneval"], ["mmlu"], ["ai2_arc"], [TASK, "mbpp"], ["global_mmlu_full"]):
            r = api.post("/v1/evaluations", json={"model": MODEL, "tasks": tasks, "limit": 1})
            _refused(r, "GRAPE_EVAL_TASKS is unset: only the tasks of the evaluators' GRAPE_EVAL_TASK_DIR")
            assert r.json()["unknown"] == [tasks[-1]]
        # a glob on the gateway allows lm-eval's names there; the evaluators still offer only their own
        with _client(evaluator["settings"].model_copy(update={"eval_tasks": "grape_*,mmlu*"})) as wide:
            r = wide.post("/v1/evaluations", json={"model": MODEL, "tasks": ["mmlu"]})
            _refused(r, "not known to the evaluators (no live evaluator offers it)")
            _refused(
                wide.post("/v1/evaluations", json={"model": MODEL, "tasks": ["hellaswag"]}),
                "GRAPE_EVAL_TASKS=grape_*,mmlu*",
            )
        r = api.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK], "limit": 1})
        assert r.status_code == 201, r.text
        assert api.post(f"/v1/evaluations/{r.json()['id']}/cancel").status_code == 202

        # an evaluation that never went through the gateway: the evaluator refuses it, lm-eval never runs
        eval_id = f"ev-{uuid.uuid4().hex[:12]}"
        spec = EvalSpec(model=MODEL, tasks=["humaneval", "mmlu"], base_model=MODEL)
        assert call(
            rclient, EVALUATIONS.enqueue(keys, eval_id, new_evaluation_fields(eval_id, spec, time.time(), 1), 100)
        )
        deadline = time.monotonic() + 120
        while (ev := api.get(f"/v1/evaluations/{eval_id}").json())["state"] not in ("failed", "succeeded"):
            assert time.monotonic() < deadline, ev
            time.sleep(0.2)
        assert ev["state"] == "failed" and "GRAPE_EVAL_TASKS" in ev["error"], ev
        logs = api.get(f"/v1/evaluations/{eval_id}/logs").text
        assert "running lm-eval" not in logs


def test_groups_count_subtasks_and_unsafe_code_runs_only_when_the_operator_allows_it(rclient, keys, settings):
    from evaluator.harness import offer
    from evaluator.loop import EvaluatorLoop

    got = offer(
        TASK_DIR,
        patterns=["grape_*", "humaneval", "mbpp", "mmlu", "mmlu_anatomy"],
        unsafe_patterns=["mbpp"],
        max_subtasks=8,
        cache_dir=settings.cache_dir,
    )
    assert "57 tasks" in got.refused["mmlu"] and "GRAPE_MAX_EVAL_SUBTASKS=8" in got.refused["mmlu"]
    assert "GRAPE_EVAL_UNSAFE_CODE_TASKS" in got.refused["humaneval"]
    assert sorted(got.offered) == ["grape_tiny_mc", "grape_tiny_missing", "mbpp", "mmlu_anatomy"]
    assert got.unsafe == {"mbpp"}

    # lm-eval's confirm_run_unsafe_code comes from the operator's list only, never from the request
    loop = EvaluatorLoop(rclient, keys, settings, name="t")
    loop.offer, loop.tasks = got, frozenset(got.offered)
    cmd = loop.command(EvalSpec(model=MODEL, tasks=["mbpp"], base_model=MODEL), Path("s"), Path("o"))
    assert "--confirm-run-unsafe-code" in cmd
    cmd = loop.command(EvalSpec(model=MODEL, tasks=["mmlu_anatomy"], base_model=MODEL), Path("s"), Path("o"))
    assert "--confirm-run-unsafe-code" not in cmd

    # the gateway names the evaluators' reason for an allowed name they do not offer
    eval_tasks.publish(rclient, keys, got.offered, got.local, got.refused)
    EVALUATIONS.beats(keys, 60).publish(rclient, "t", {"tasks": len(got.offered)})  # the loop above, as if it ran
    with _client(settings.model_copy(update={"eval_tasks": "*"})) as api:
        r = api.post("/v1/evaluations", json={"model": MODEL, "tasks": ["mmlu"]})
        _refused(r, "runs 57 tasks", "GRAPE_MAX_EVAL_SUBTASKS=8")


def test_echoed_task_names_are_cut_to_64_characters(evaluator) -> None:
    long = "t" * 200
    with _client(evaluator["settings"]) as api:
        for tasks in ([long], [TASK, long], [long + "x", "x" + long]):
            r = api.post("/v1/evaluations", json={"model": MODEL, "tasks": tasks})
            assert r.status_code == 422, r.text
            assert "t" * 65 not in r.text, r.text
            assert "t" * 64 in r.text
        r = api.post("/v1/evaluations", json={"model": MODEL, "tasks": [long + "!"]})  # not a task name
        assert r.status_code == 422 and "t" * 65 not in r.text, r.text
        r = api.post("/v1/evaluations", json={"model": MODEL, "tasks": [long, long]})  # a duplicate
        assert r.status_code == 422 and "t" * 65 not in r.text, r.text


def test_near_matches_run_off_the_event_loop(evaluator, redis_url, rclient) -> None:
    keys = evaluator["keys"]
    # a second evaluator with GRAPE_EVAL_TASKS=* publishes lm-eval's ~15,000 names; here 60,000 of that shape
    stems = ("mmlu", "arc_challenge", "hellaswag", "belebele", "global_mmlu_full", "flores")
    names = [f"{stem}_{lang}_{i}" for i, (stem, lang) in enumerate((s, b) for s in stems for b in range(10_000))]
    eval_tasks.publish(rclient, keys, names)
    proc, url = start_gateway(redis_url, keys, GRAPE_EVAL_TASKS="*")
    try:
        # long misspellings (up to 200 characters are a valid name): difflib's cost grows with the length
        bad = [f"{'mmlu_' if i % 2 else 'belebele_'}misspelled_{i}_".ljust(200, "q") for i in range(8)]
        answers: list[httpx.Response] = []

        def ask(task: str) -> None:
            answers.append(httpx.post(f"{url}/v1/evaluations", json={"model": MODEL, "tasks": [task]}, timeout=120))

        threads = [threading.Thread(target=ask, args=(t,)) for t in bad]
        for t in threads:
            t.start()
        worst = 0.0
        with httpx.Client(base_url=url, timeout=30) as probe:  # one connection: only the answer time counts
            while any(t.is_alive() for t in threads):
                t0 = time.monotonic()
                assert probe.get("/healthz").status_code == 200
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.05)
        for t in threads:
            t.join()
        assert len(answers) == 8 and all(r.status_code == 422 for r in answers), [r.text for r in answers]
        assert all("not known to the evaluators" in r.json()["detail"] for r in answers)
        print(f"\n/healthz during 8 misspelled evaluations over {len(names)} names: worst {worst * 1000:.0f} ms")
        assert worst < 1.0, worst
        # and the hint still helps
        r = httpx.post(f"{url}/v1/evaluations", json={"model": MODEL, "tasks": ["grape_tiny_mcq"]}, timeout=60)
        assert r.status_code == 422 and TASK in r.json()["near"], r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        rclient.srem(keys.eval_tasks(), *names)
