"""A way out for everything (issue 19): DELETE of evaluations and experiments (409 while active, and then
nothing of them left in Redis), GRAPE_RETENTION_DAYS (ended records expire with their logs and stored
selections, lists never show them, active ones stay), the arm selection served page by page, the
experiment driver going on past an experiment that raises, and a base_model that looks like a job id
refused before anything is stored.

Fast: the real gateway app on real Redis; the dataset is scored by a real worker on the null backend; an
evaluator and a trainer are stood in for through the store's own scripts (their heartbeat, start, finish),
since none of this is about what they compute."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from grape.experiments import write_stored_selection
from grape.keys import Keys
from grape.settings import Settings
from grape.store import eval_tasks
from grape.store import experiments as exp_store
from grape.store.io import call
from grape.store.jobqueue import EVALUATIONS, TRAINING
from service.app import create_app
from tests.conftest import MODEL, load_pool, wait_done
from workers.backends import BackendConfig, load_backend
from workers.loop import Worker

TASK = "grape_tiny_mc"
HP = {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 128}


def client(settings: Settings, **update: Any) -> TestClient:
    """The real gateway app (its lifespan runs the experiment driver) on this test's key prefix."""
    return TestClient(create_app(settings.model_copy(update=update)), base_url="http://localhost")


def fake_evaluator(rclient: redis.Redis, keys: Keys, name: str = "stand-in") -> str:
    """An evaluator's presence as the gateway sees it: a live heartbeat and the task names it can run."""
    EVALUATIONS.beats(keys, 600).publish(rclient, name, {"name": name})
    eval_tasks.publish(rclient, keys, [TASK], [TASK])  # a task of its GRAPE_EVAL_TASK_DIR
    return name


def hold(rclient: redis.Redis, keys: Keys, queue: Any, item_id: str, holder: str) -> None:
    """Take a queued record and start it, as a trainer or an evaluator loop does (with a live heartbeat)."""
    q = queue.space(keys)
    queue.beats(keys, 600).publish(rclient, holder, {"name": holder})
    rclient.lrem(q.queue(), 0, item_id)
    rclient.lpush(q.claimed(holder), item_id)
    assert call(rclient, queue.start(keys, item_id, holder)) is not None


def keys_naming(rclient: redis.Redis, keys: Keys, item_id: str) -> list[str]:
    """Every key of this test's prefix whose name carries the id, and every index that still lists it."""
    found = [k.decode() for k in rclient.scan_iter(match=f"{keys.prefix}:*{item_id}*", count=1000)]
    lists = {
        b"zset": lambda key: rclient.zscore(key, item_id) is not None,
        b"set": lambda key: rclient.sismember(key, item_id),
        b"list": lambda key: item_id.encode() in rclient.lrange(key, 0, -1),
    }
    for key in rclient.scan_iter(match=f"{keys.prefix}:*", count=1000):
        names_it = lists.get(rclient.type(key))
        if names_it is not None and names_it(key):
            found.append(key.decode())
    return found


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


@pytest.fixture
def scored(settings: Settings, rclient: redis.Redis, keys: Keys, model_path: str) -> Iterator[str]:
    """A dataset of four real items, scored by a real worker on the null backend (every score 0.0)."""
    backend = load_backend("null", BackendConfig(model=model_path))
    worker = Worker(rclient, keys, MODEL, backend, block_ms=100)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        with client(settings) as api:
            ds = api.post("/v1/datasets", json={"name": "lifecycle", "target_model": MODEL}).json()["id"]
            items = load_pool(4, start=10, max_chars=100, candidates=2)
            assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 4
            wait_done(api, ds, timeout=60)
    finally:
        worker.stop()
        thread.join(timeout=60)
    yield ds


def experiment(ds: str, **kw: Any) -> dict[str, Any]:
    body = {
        "dataset_id": ds,
        "arms": [{"strategy": "random", "seed": 1}, {"strategy": "longest"}],
        "budget": {"pairs": 2},
        "hyperparameters": HP,
        "evaluation": {"tasks": [TASK]},
        "include_base": True,
    }
    return body | kw


# ---- DELETE /v1/evaluations/{id} ---------------------------------------------------------------------------


def test_an_evaluation_is_deleted_once_it_has_ended_with_its_log(settings, rclient, keys) -> None:
    fake_evaluator(rclient, keys)
    with client(settings) as api:
        eval_id = api.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}).json()["id"]
        assert rclient.exists(keys.evaluations.log(eval_id))

        # queued, then running: 409, saying to cancel first and how; nothing removed
        r = api.delete(f"/v1/evaluations/{eval_id}")
        assert r.status_code == 409, r.text
        assert f"POST /v1/evaluations/{eval_id}/cancel" in r.json()["detail"] and r.json()["state"] == "queued"
        hold(rclient, keys, EVALUATIONS, eval_id, "stand-in")
        r = api.delete(f"/v1/evaluations/{eval_id}")
        assert r.status_code == 409 and "cancel it first" in r.json()["detail"] and r.json()["state"] == "running"
        assert api.get(f"/v1/evaluations/{eval_id}").json()["state"] == "running"

        # it ends (the evaluator's own end script): deleted, record, log, flags and index entries with it
        results = {"results": {TASK: {"acc": {"value": 0.5, "stderr": 0.1}}}}
        assert call(rclient, EVALUATIONS.finish(keys, eval_id, "stand-in", "succeeded", "done", fields=results))
        assert rclient.zscore(keys.evaluations.finished(), eval_id) is not None
        assert api.delete(f"/v1/evaluations/{eval_id}").status_code == 204
        assert keys_naming(rclient, keys, eval_id) == []
        assert api.get(f"/v1/evaluations/{eval_id}").status_code == 404
        assert api.get(f"/v1/evaluations/{eval_id}/logs").status_code == 404
        assert api.get("/v1/evaluations").json()["evaluations"] == []
        assert api.delete(f"/v1/evaluations/{eval_id}").status_code == 404

        # a queued one cancelled is deletable at once; ids that are not ids are 404 before Redis
        other = api.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}).json()["id"]
        assert api.post(f"/v1/evaluations/{other}/cancel").json()["state"] == "cancelled"
        assert api.delete(f"/v1/evaluations/{other}").status_code == 204
        assert keys_naming(rclient, keys, other) == []
        assert api.delete("/v1/evaluations/ev-000000000000").status_code == 404
        assert api.delete("/v1/evaluations/ev-x:log").status_code == 404


# ---- DELETE /v1/experiments/{id} ---------------------------------------------------------------------------


def test_an_experiment_is_deleted_once_it_has_ended_its_runs_stay_unless_asked(settings, rclient, keys, scored) -> None:
    fake_evaluator(rclient, keys)
    with client(settings) as api:
        r = api.post("/v1/experiments", json=experiment(scored))
        assert r.status_code == 201, r.text
        exp_id = r.json()["id"]
        assert rclient.exists(keys.experiment_selection(exp_id, 0), keys.experiment_selection(exp_id, 1)) == 2

        r = api.delete(f"/v1/experiments/{exp_id}")
        assert r.status_code == 409, r.text
        assert f"POST /v1/experiments/{exp_id}/cancel" in r.json()["detail"] and "cancel it first" in r.text
        assert api.get(f"/v1/experiments/{exp_id}").status_code == 200

        exp = api.post(f"/v1/experiments/{exp_id}/cancel").json()
        assert exp["state"] == "cancelled"
        jobs = [a["job_id"] for a in exp["arms"]]
        base_eval = exp["base"]["eval_id"]
        assert api.delete(f"/v1/experiments/{exp_id}").status_code == 204

        # the record, its stored selections and every index entry are gone; its runs are not
        assert keys_naming(rclient, keys, exp_id) == []
        assert api.get(f"/v1/experiments/{exp_id}").status_code == 404
        assert api.get(f"/v1/experiments/{exp_id}/arms/0/selection").status_code == 404
        assert api.get("/v1/experiments").json()["experiments"] == []
        assert [api.get(f"/v1/training-jobs/{j}").json()["state"] for j in jobs] == ["cancelled", "cancelled"]
        assert api.get(f"/v1/evaluations/{base_eval}").json()["state"] == "cancelled"
        assert api.delete(f"/v1/experiments/{exp_id}").status_code == 404

        # with_runs=true: its jobs (whose directories the trainers then remove) and evaluations go too,
        # but not while one of them still runs (a cancelled job stops after its current step)
        exp_id = api.post("/v1/experiments", json=experiment(scored)).json()["id"]
        exp = api.get(f"/v1/experiments/{exp_id}").json()
        running_job = exp["arms"][0]["job_id"]
        hold(rclient, keys, TRAINING, running_job, "trainer-1")
        exp = api.post(f"/v1/experiments/{exp_id}/cancel").json()
        jobs, evals = [a["job_id"] for a in exp["arms"]], [exp["base"]["eval_id"]]
        r = api.delete(f"/v1/experiments/{exp_id}", params={"with_runs": "true"})
        assert r.status_code == 409 and running_job in r.json()["detail"], r.text
        assert api.get(f"/v1/experiments/{exp_id}").status_code == 200  # nothing removed
        assert call(rclient, TRAINING.finish(keys, running_job, "trainer-1", "cancelled", "cancelled"))
        assert api.delete(f"/v1/experiments/{exp_id}", params={"with_runs": "true"}).status_code == 204
        for item_id in [exp_id, *evals]:
            assert keys_naming(rclient, keys, item_id) == [], item_id
        for job_id in jobs:  # only the deleted index names them: the trainers remove their directories
            assert keys_naming(rclient, keys, job_id) == [keys.training.deleted()]
            assert api.get(f"/v1/training-jobs/{job_id}").status_code == 404
        listed = [j["id"] for j in api.get("/v1/training-jobs").json()["jobs"]]
        listed += [e["id"] for e in api.get("/v1/evaluations").json()["evaluations"]]
        assert not set(listed) & {*jobs, *evals}
        assert api.delete("/v1/experiments/exp-000000000000").status_code == 404


# ---- GRAPE_RETENTION_DAYS ----------------------------------------------------------------------------------


def test_retention_setting_is_positive_or_unset(keys) -> None:
    assert Settings(key_prefix=keys.prefix).retention_days is None
    for bad in (0, -1):
        with pytest.raises(ValueError, match="retention_days"):
            Settings(key_prefix=keys.prefix, retention_days=bad)


def test_ended_records_expire_with_their_logs_and_selections(settings, rclient, keys, scored) -> None:
    """GRAPE_RETENTION_DAYS=0.00002 (1.7 s): what ended goes without anyone reading it (the gateway's background
    pass); what has not ended stays however old it is."""
    fake_evaluator(rclient, keys)
    with client(settings, retention_days=0.00002, experiment_poll_s=0.2) as api:
        ended = api.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}).json()["id"]
        waiting = api.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}).json()["id"]
        exp_id = api.post("/v1/experiments", json=experiment(scored)).json()["id"]
        exp = api.post(f"/v1/experiments/{exp_id}/cancel").json()
        jobs = [a["job_id"] for a in exp["arms"]]
        assert api.post(f"/v1/evaluations/{ended}/cancel").json()["state"] == "cancelled"
        # a job that ended and was resumed is queued again: it is not expired on its first end
        resumed = api.post("/v1/training-jobs", json={"dataset_id": scored, "strategy": "random"}).json()["id"]
        assert api.post(f"/v1/training-jobs/{resumed}/cancel").json()["state"] == "cancelled"
        assert api.post(f"/v1/training-jobs/{resumed}/resume").json()["state"] == "queued"
        t_ended = time.monotonic()
        gone = [ended, exp_id, exp["base"]["eval_id"]]

        def expired() -> bool:
            # a job's id stays in the deleted index only: the trainers remove its directory when they see it there
            done = all(keys_naming(rclient, keys, i) == [] for i in gone)
            return done and all(keys_naming(rclient, keys, j) == [keys.training.deleted()] for j in jobs)

        # no request reads them meanwhile: only the background pass removes them
        wait_for(expired, "expiry", 30)
        assert time.monotonic() - t_ended > 1.7
        assert not rclient.exists(keys.experiment_selection(exp_id, 0), keys.experiment_selection(exp_id, 1))
        assert api.get(f"/v1/evaluations/{ended}").status_code == 404
        assert api.get(f"/v1/experiments/{exp_id}").status_code == 404
        assert api.get(f"/v1/training-jobs/{jobs[0]}").status_code == 404
        assert api.get("/v1/experiments").json()["experiments"] == []
        # the queued evaluation and the resumed job are older than the retention too, but have not ended
        assert [e["id"] for e in api.get("/v1/evaluations").json()["evaluations"]] == [waiting]
        assert api.get(f"/v1/evaluations/{waiting}").json()["state"] == "queued"
        assert [j["id"] for j in api.get("/v1/training-jobs").json()["jobs"]] == [resumed]
        assert api.get(f"/v1/training-jobs/{resumed}").json()["state"] == "queued"


def test_records_that_ended_before_the_finished_index_expire_too(settings, rclient, keys, scored) -> None:
    """An upgrade: records that ended under an earlier version are in no finished index. The gateway walks the
    ids indexes once (a batch per pass) and enters them, with their own end time."""
    fake_evaluator(rclient, keys)
    with client(settings) as api:  # no retention: nothing walks or expires
        eval_id = api.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}).json()["id"]
        api.post(f"/v1/evaluations/{eval_id}/cancel")
        exp = api.post("/v1/experiments", json=experiment(scored, include_base=False)).json()
        exp = api.post(f"/v1/experiments/{exp['id']}/cancel").json()
    old = [eval_id, exp["id"], *(a["job_id"] for a in exp["arms"])]
    for index in (keys.evaluations.finished(), keys.experiments_finished(), keys.training.finished()):
        rclient.zrem(index, *old)  # as an earlier version left them
    time.sleep(1.8)
    with client(settings, retention_days=0.00002, experiment_poll_s=0.2) as api:
        wait_for(lambda: all(keys_naming(rclient, keys, i) in ([], [keys.training.deleted()]) for i in old), "expiry")
        assert api.get("/v1/experiments").json()["experiments"] == []
        assert api.get("/v1/evaluations").json()["evaluations"] == []
        assert api.get("/v1/training-jobs").json()["jobs"] == []


def test_without_retention_ended_records_stay(settings, rclient, keys) -> None:
    fake_evaluator(rclient, keys)
    with client(settings, experiment_poll_s=0.1) as api:
        eval_id = api.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}).json()["id"]
        api.post(f"/v1/evaluations/{eval_id}/cancel")
        time.sleep(1)
        assert api.get(f"/v1/evaluations/{eval_id}").json()["state"] == "cancelled"
        assert rclient.zscore(keys.evaluations.finished(), eval_id) is not None


# ---- the arm selection, page by page -----------------------------------------------------------------------


def test_the_arm_selection_is_read_and_sent_a_page_at_a_time(
    settings, rclient, keys, scored, monkeypatch, tmp_path
) -> None:
    fake_evaluator(rclient, keys)
    with client(settings) as api:
        exp_id = api.post("/v1/experiments", json=experiment(scored, include_base=False)).json()["id"]
        stored = api.get(f"/v1/experiments/{exp_id}/arms/0/selection").content
        assert len(stored.splitlines()) == 2 and orjson.loads(stored.splitlines()[0])["id"]

        # a stored selection of 2.5 pages (the size a large budget stores)
        line = orjson.dumps({"id": "x" * 100, "instruction": "i" * 900, "response": "r" * 3000}) + b"\n"
        big = line * (int(2.5 * exp_store.SELECTION_PAGE) // len(line))
        rclient.set(keys.experiment_selection(exp_id, 1), big)

        reads: list[int] = []
        real_page = exp_store.selection_page

        def counted(*args: Any, **kw: Any) -> Any:
            got = yield from real_page(*args, **kw)
            reads.append(len(got))
            return got

        def whole(*_: Any, **__: Any) -> Any:
            raise AssertionError("the gateway read the whole stored selection at once")

        monkeypatch.setattr(exp_store, "selection_page", counted)
        monkeypatch.setattr(exp_store, "arm_selection", whole)
        with api.stream("GET", f"/v1/experiments/{exp_id}/arms/1/selection") as r:
            assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
            chunks = list(r.iter_raw())
        assert b"".join(chunks) == big
        assert len(reads) == 3 and max(reads) == exp_store.SELECTION_PAGE and sum(reads) == len(big)
        assert api.get(f"/v1/experiments/{exp_id}/arms/0/selection").content == stored
        assert api.get(f"/v1/experiments/{exp_id}/arms/2/selection").status_code == 404
    # the trainer writes an arm's selection to its job directory the same way, a page at a time
    assert write_stored_selection(rclient, keys, f"{exp_id}/1", tmp_path / "sel.jsonl") == len(big.splitlines())
    assert (tmp_path / "sel.jsonl").read_bytes() == big


# ---- the experiment driver ---------------------------------------------------------------------------------


def test_the_driver_advances_the_others_past_an_experiment_that_raises(
    settings, rclient, keys, scored, monkeypatch
) -> None:
    fake_evaluator(rclient, keys)
    with client(settings) as api:  # the POST advances it once (its jobs queued); the driver does the rest
        good = api.post("/v1/experiments", json=experiment(scored, include_base=False)).json()["id"]
    record = orjson.loads(rclient.get(keys.experiment(good)))
    assert record["state"] == "training"

    # beside it: a record that is not JSON, and one that is but makes advancing raise (an arm whose training
    # job is still to be queued, without its selection parameters)
    corrupt, raising = "exp-00000000bad1", "exp-00000000bad2"
    rclient.set(keys.experiment(corrupt), b"{not json")
    arm = {**record["arms"][0], "params": {}, "job_created": False, "state": "queued", "job_id": "job-0000000bad20"}
    broken = {**record, "id": raising, "arms": [arm]}
    rclient.set(keys.experiment(raising), orjson.dumps(broken))
    rclient.sadd(keys.experiments_active(), corrupt, raising)
    rclient.zadd(keys.experiments(), {corrupt: 1, raising: 2})

    real_active = exp_store.active

    def bad_ones_first(k: Keys) -> Any:
        ids = yield from real_active(k)
        return sorted(ids, key=lambda i: i == good)

    monkeypatch.setattr(exp_store, "active", bad_ones_first)
    for arm in record["arms"]:  # the good one's jobs end (cancelled through the training queue's own script)
        assert call(rclient, TRAINING.cancel(keys, arm["job_id"])) == b"cancelled-now"

    with client(settings, experiment_poll_s=0.1) as api:
        # nobody reads it: the driver's passes alone move it to its end (no arm trained: failed)
        state = wait_for(
            lambda: (s := orjson.loads(rclient.get(keys.experiment(good)))["state"]) in ("failed", "cancelled") and s,
            "the driver to advance the good experiment",
        )
        assert state == "failed"
        kept = orjson.loads(rclient.get(keys.experiment(raising)))
        assert kept["driver_error"].startswith("KeyError: 'reduce'") and kept["state"] == "training"
        assert rclient.sismember(keys.experiments_active(), raising)  # retried every pass
        assert not rclient.sismember(keys.experiments_active(), corrupt)  # can never advance: left for DELETE

        # the requests on them answer, never a 500
        r = api.get(f"/v1/experiments/{raising}")
        assert r.status_code == 200 and r.json()["driver_error"].startswith("KeyError"), r.text
        r = api.get(f"/v1/experiments/{corrupt}")
        assert r.status_code == 409 and f"DELETE /v1/experiments/{corrupt}" in r.json()["detail"], r.text
        assert good in [e["id"] for e in api.get("/v1/experiments").json()["experiments"]]
        assert api.delete(f"/v1/experiments/{corrupt}").status_code == 204
        assert keys_naming(rclient, keys, corrupt) == []


@pytest.mark.parametrize("base_model", ["job-0123456789ab", "job-1", " job-x "])
def test_a_base_model_that_looks_like_a_job_id_is_refused_before_anything_is_stored(
    settings, rclient, keys, scored, base_model
) -> None:
    """With GRAPE_ALLOWED_MODELS=* any name passes the model check; `job-…` would then name a training job to the
    evaluation of the base model (500 after the experiment was stored, and a driver raising every pass)."""
    fake_evaluator(rclient, keys)
    before = set(rclient.scan_iter(match=f"{keys.prefix}:*", count=1000))
    with client(settings, allowed_models="*") as api:
        r = api.post("/v1/experiments", json=experiment(scored, base_model=base_model))
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "base_model" and r.json()["detail"].startswith("base_model: "), r.text
        assert api.get("/v1/experiments").json()["experiments"] == []
    assert set(rclient.scan_iter(match=f"{keys.prefix}:*", count=1000)) == before
    assert rclient.zcard(keys.experiments()) == 0 and rclient.llen(keys.training.queue()) == 0
