"""Tenants, their quotas and the follow limit per key (issue 19), tried as an outside reviewer would.

Two tenants (`alpha`, `beta`) and an operator (`ops`, GRAPE_ADMIN_KEYS) on one gateway with keys: every route
that reads, lists, follows, cancels, resumes, deletes or builds on a resource is tried across tenants, and each
such request must answer exactly what an unknown id of the same form answers (status and body, the id aside),
and leave the resource as it was; ended evaluations and experiments are deleted by their tenant or an admin only.
Quotas from a real GRAPE_TENANTS_FILE are each reached. Fair share across tenants is counted with two null workers
(tests.test_fair_share's Recorder); GRAPE_RETENTION_DAYS expires one tenant's ended resources, not another's
unended ones. Real Redis, the gateway app in process (and as a uvicorn process where the limit lives in the
server), a real worker thread on the null backend (it loads the real tokenizer, scores 0.0: the datasets reach
`done` in a second).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from grape.cli import main as cli_main
from grape.experiments import TERMINAL, ExperimentState
from grape.keys import Keys
from grape.models import resolve_model
from grape.settings import Settings
from grape.store import eval_tasks
from grape.store.jobqueue import EVALUATIONS
from grape.tenancy import QUOTAS, Quotas, parse_quotas
from service.app import create_app
from tests.conftest import MODEL, start_gateway
from tests.test_fair_share import Recorder, _items
from workers.backends import BackendConfig, load_backend
from workers.loop import Worker

KEYS = {"alpha": "alpha-key-1", "alpha2": "alpha-key-2", "beta": "beta-key-1", "ops": "ops-admin-key"}
API_KEYS = f"alpha:{KEYS['alpha']},alpha:{KEYS['alpha2']},beta:{KEYS['beta']}"
ADMIN_KEYS = f"ops:{KEYS['ops']}"
TASK = "tiny_task"
UNKNOWN = {"ds": "ds-000000000000", "job": "job-000000000000", "ev": "ev-000000000000", "exp": "exp-000000000000"}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def items(n: int, candidates: int = 2, prefix: str = "it") -> list[dict[str, Any]]:
    return [
        {
            "id": f"{prefix}{i}",
            "instruction": f"Say {i}.",
            "candidates": [{"source": f"s{c}", "response": f"{i} {'ok ' * (c + 1)}"} for c in range(candidates)],
        }
        for i in range(n)
    ]


# fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture
def null_worker(rclient: redis.Redis, keys: Keys) -> Iterator[Worker]:
    """A real worker on the null backend (real tokenizer, scores 0.0), in a thread."""
    backend = load_backend("null", BackendConfig(model=resolve_model(MODEL)))
    w = Worker(rclient, keys, MODEL, backend, block_ms=100)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    yield w
    w.stop()
    t.join(timeout=60)


@pytest.fixture
def evaluator(rclient: redis.Redis, keys: Keys) -> None:
    """An evaluator's heartbeat and the task it can run: evaluations can be created (none runs here)."""
    EVALUATIONS.beats(keys, 600).publish(rclient, "eval-test", {"name": "eval-test"})
    eval_tasks.publish(rclient, keys, [TASK], [TASK])  # a task of its GRAPE_EVAL_TASK_DIR


def tenants_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    return path


def app_settings(redis_url: str, keys: Keys, **kw: Any) -> Settings:
    return Settings(
        redis_url=redis_url, key_prefix=keys.prefix, api_keys=API_KEYS, admin_keys=ADMIN_KEYS, chunk_pairs=16, **kw
    )


@pytest.fixture
def gw(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[TestClient]:
    s = app_settings(redis_url, keys, experiment_poll_s=0.2)
    with TestClient(create_app(s), raise_server_exceptions=False) as client:
        yield client


def wait_done(c: TestClient, who: str, ds: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while c.get(f"/v1/datasets/{ds}", headers=auth(who)).json()["state"] != "done":
        assert time.monotonic() < deadline, "the null worker did not score the dataset"
        time.sleep(0.1)


def scored_dataset(c: TestClient, who: str, n: int = 3) -> str:
    r = c.post("/v1/datasets", json={"name": f"{who}-data", "target_model": MODEL}, headers=auth(who))
    assert r.status_code == 201, r.text
    ds = r.json()["id"]
    r = c.post(f"/v1/datasets/{ds}/items", json={"items": items(n)}, headers=auth(who))
    assert r.status_code == 202 and r.json()["accepted"] == n, r.text
    wait_done(c, who, ds)
    return ds


def experiment_body(ds: str, arms: list[str]) -> dict[str, Any]:
    return {
        "dataset_id": ds,
        "arms": [{"strategy": a} for a in arms],
        "budget": {"pairs": 1},
        "evaluation": {"tasks": [TASK], "limit": 2},
        "hyperparameters": {"max_steps": 1},
    }


def same_as_unknown(r: httpx.Response, real: str, unknown_r: httpx.Response, unknown: str) -> None:
    """A cross-tenant answer is the unknown id's answer: same status, same body once the id is set aside."""
    assert r.status_code == unknown_r.status_code, (r.status_code, r.text, unknown_r.status_code, unknown_r.text)
    assert r.text.replace(real, "<id>") == unknown_r.text.replace(unknown, "<id>"), (r.text, unknown_r.text)


# two tenants and an admin through every route ----------------------------------------------------------
def test_another_tenants_resources_answer_exactly_as_unknown_ids_and_stay_unchanged(
    gw, null_worker, evaluator, rclient, keys
) -> None:
    c = gw
    # beta owns one of each kind
    ds = scored_dataset(c, "beta")
    job = c.post("/v1/training-jobs", json={"dataset_id": ds}, headers=auth("beta"))
    assert job.status_code == 201, job.text
    job = job.json()["id"]
    ev = c.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}, headers=auth("beta"))
    assert ev.status_code == 201, ev.text
    ev = ev.json()["id"]
    exp = c.post("/v1/experiments", json=experiment_body(ds, ["grape"]), headers=auth("beta"))
    assert exp.status_code == 201, exp.text
    exp = exp.json()["id"]
    ids = {"ds": ds, "job": job, "ev": ev, "exp": exp}
    owned = [f"/v1/datasets/{ds}", f"/v1/training-jobs/{job}", f"/v1/evaluations/{ev}", f"/v1/experiments/{exp}"]

    def snapshot() -> list[Any]:
        views = [c.get(p, headers=auth("beta")).json() for p in owned]
        views += [c.get(f"{p}/logs", headers=auth("beta")).text for p in owned[1:3]]
        views.append(c.get(f"/v1/experiments/{exp}/arms/0/selection", headers=auth("beta")).text)
        raw = [rclient.dump(k) for k in (keys.dataset(ds), keys.items(ds), keys.scores(ds), keys.stats(ds))]
        raw += [rclient.hgetall(keys.training.record(job)), rclient.hgetall(keys.evaluations.record(ev))]
        return [*views, *raw, rclient.get(keys.experiment(exp))]

    before = snapshot()
    assert [v["tenant"] for v in before[:4]] == ["beta"] * 4

    # every route, by alpha: method, path template with {ds} {job} {ev} {exp}, json body
    requests: list[tuple[str, str, Any]] = [
        ("GET", "/v1/datasets/{ds}", None),
        ("DELETE", "/v1/datasets/{ds}", None),
        ("POST", "/v1/datasets/{ds}/items", {"items": items(2, prefix="x")}),
        ("GET", "/v1/datasets/{ds}/items/it0", None),
        ("GET", "/v1/datasets/{ds}/failures", None),
        ("GET", "/v1/datasets/{ds}/selection?strategy=grape", None),
        ("POST", "/v1/datasets/{ds}/scores", {"scores": ["length"]}),
        ("GET", "/v1/datasets/{ds}/compare?strategies=grape,longest", None),
        ("GET", "/v1/datasets/{ds}/summary", None),
        ("GET", "/v1/datasets/{ds}/teachers", None),
        ("POST", "/v1/training-jobs", {"dataset_id": "{ds}"}),
        ("GET", "/v1/training-jobs/{job}", None),
        ("GET", "/v1/training-jobs/{job}/logs", None),
        ("GET", "/v1/training-jobs/{job}/logs?follow=true", None),
        ("POST", "/v1/training-jobs/{job}/cancel", None),
        ("POST", "/v1/training-jobs/{job}/resume", None),
        ("DELETE", "/v1/training-jobs/{job}", None),
        ("POST", "/v1/evaluations", {"model": "{job}", "tasks": [TASK]}),
        ("GET", "/v1/evaluations/{ev}", None),
        ("GET", "/v1/evaluations/{ev}/logs", None),
        ("GET", "/v1/evaluations/{ev}/logs?follow=true", None),
        ("POST", "/v1/evaluations/{ev}/cancel", None),
        ("DELETE", "/v1/evaluations/{ev}", None),
        ("POST", "/v1/experiments", experiment_body("{ds}", ["grape"])),
        ("GET", "/v1/experiments/{exp}", None),
        ("GET", "/v1/experiments/{exp}/arms/0/selection", None),
        ("POST", "/v1/experiments/{exp}/cancel", None),
        ("DELETE", "/v1/experiments/{exp}", None),
        ("DELETE", "/v1/experiments/{exp}?with_runs=true", None),
    ]
    for method, path, body in requests:
        kind = next(k for k in ("ds", "job", "ev", "exp") if "{" + k + "}" in path + json.dumps(body))

        def send(value: str, method=method, path=path, body=body, kind=kind) -> httpx.Response:
            filled = json.loads(json.dumps(body).replace("{" + kind + "}", value)) if body is not None else None
            return c.request(method, path.replace("{" + kind + "}", value), json=filled, headers=auth("alpha"))

        cross, unknown = send(ids[kind]), send(UNKNOWN[kind])
        assert cross.status_code in (404, 422), (method, path, cross.status_code, cross.text)
        same_as_unknown(cross, ids[kind], unknown, UNKNOWN[kind])
    assert snapshot() == before, "a cross-tenant request changed another tenant's resource"

    # lists: alpha sees only its own, beta its own, the admin every tenant's
    mine = c.post("/v1/datasets", json={"name": "alpha-data", "target_model": MODEL}, headers=auth("alpha"))
    alpha_ds = mine.json()["id"]
    lists = {
        "datasets": ("/v1/datasets", "datasets"),
        "jobs": ("/v1/training-jobs", "jobs"),
        "evals": ("/v1/evaluations", "evaluations"),
        "exps": ("/v1/experiments", "experiments"),
    }

    def listed(who: str, name: str) -> set[str]:
        path, field = lists[name]
        r = c.get(path, headers=auth(who))
        assert r.status_code == 200, r.text
        return {x["id"] for x in r.json()[field]}

    assert listed("alpha", "datasets") == {alpha_ds} and listed("alpha2", "datasets") == {alpha_ds}
    assert listed("alpha", "jobs") == listed("alpha", "evals") == listed("alpha", "exps") == set()
    assert listed("beta", "datasets") == {ds}
    beta_jobs, beta_evals = listed("beta", "jobs"), listed("beta", "evals")
    assert job in beta_jobs and len(beta_jobs) == 2  # its own and the experiment's arm
    assert ev in beta_evals and len(beta_evals) == 2  # its own and the experiment's base model
    assert listed("beta", "exps") == {exp}
    assert listed("ops", "datasets") == {ds, alpha_ds}
    assert listed("ops", "jobs") == beta_jobs and listed("ops", "evals") == beta_evals
    assert c.get(f"/v1/evaluations?experiment_id={exp}", headers=auth("alpha")).json()["evaluations"] == []

    # the admin sees and manages every tenant's
    for path in owned:
        r = c.get(path, headers=auth("ops"))
        assert r.status_code == 200 and r.json()["tenant"] == "beta", r.text
    assert c.get(f"/v1/experiments/{exp}/arms/0/selection", headers=auth("ops")).status_code == 200
    assert c.post(f"/v1/training-jobs/{job}/cancel", headers=auth("ops")).json()["state"] == "cancelled"
    assert c.post(f"/v1/evaluations/{ev}/cancel", headers=auth("ops")).json()["state"] == "cancelled"
    assert c.post(f"/v1/experiments/{exp}/cancel", headers=auth("ops")).json()["state"] == "cancelled"
    assert c.delete(f"/v1/training-jobs/{job}", headers=auth("ops")).status_code == 204
    assert c.delete(f"/v1/evaluations/{ev}", headers=auth("ops")).status_code == 204
    assert c.delete(f"/v1/experiments/{exp}", params={"with_runs": "true"}, headers=auth("ops")).status_code == 204
    assert c.get(f"/v1/evaluations/{ev}", headers=auth("beta")).status_code == 404
    assert c.get(f"/v1/experiments/{exp}", headers=auth("beta")).status_code == 404
    assert listed("beta", "exps") == set() and listed("beta", "jobs") == listed("beta", "evals") == set()
    assert c.delete(f"/v1/datasets/{ds}", headers=auth("ops")).status_code == 204
    assert c.get(f"/v1/datasets/{ds}", headers=auth("beta")).status_code == 404
    # what an admin creates is its own tenant's
    made = c.post("/v1/datasets", json={"name": "ops-data", "target_model": MODEL}, headers=auth("ops"))
    assert made.json()["tenant"] == "ops"
    assert made.json()["id"] not in listed("beta", "datasets") | listed("alpha", "datasets")


def test_a_job_of_another_tenant_cannot_be_evaluated_or_built_on(gw, null_worker, evaluator) -> None:
    """`model: job-…` of another tenant is the unknown job's 422; the owner gets the real answer (409 here:
    the job has not succeeded)."""
    ds = scored_dataset(gw, "beta")
    job = gw.post("/v1/training-jobs", json={"dataset_id": ds}, headers=auth("beta")).json()["id"]
    own = gw.post("/v1/evaluations", json={"model": job, "tasks": [TASK]}, headers=auth("beta"))
    assert own.status_code == 409, own.text
    cross = gw.post("/v1/evaluations", json={"model": job, "tasks": [TASK]}, headers=auth("alpha"))
    unknown = gw.post("/v1/evaluations", json={"model": UNKNOWN["job"], "tasks": [TASK]}, headers=auth("alpha"))
    assert cross.status_code == 422
    same_as_unknown(cross, job, unknown, UNKNOWN["job"])


# quotas ------------------------------------------------------------------------------------------------
QUOTA_FILE = """
[defaults]
active_experiments = 5

[tenants.alpha]
stored_pairs = 6
datasets = 2
active_training_jobs = 1
active_evaluations = 1
active_experiments = 1
"""


def quota_refusal(r: httpx.Response, quota: str, limit: int, usage: int) -> None:
    assert r.status_code == 403, r.text
    body = r.json()
    assert (body["quota"], body["limit"], body["usage"], body["tenant"]) == (quota, limit, usage, "alpha"), body
    assert quota in body["detail"]


def test_each_quota_is_reached_named_and_usage_stays_exact(
    redis_url, keys, tmp_path, null_worker, evaluator, rclient
) -> None:
    s = app_settings(redis_url, keys, tenants_file=tenants_file(tmp_path, QUOTA_FILE))
    with TestClient(create_app(s)) as c:
        a = auth("alpha")

        def usage() -> dict[str, int]:
            r = c.get("/v1/usage", headers=a)
            assert r.status_code == 200 and r.json()["tenant"] == "alpha" and r.json()["admin"] is False
            assert r.json()["tenants"] is None
            return r.json()["usage"]

        limits = c.get("/v1/usage", headers=a).json()["limits"]
        assert limits == {
            "stored_pairs": 6,
            "datasets": 2,
            "active_training_jobs": 1,
            "active_evaluations": 1,
            "active_experiments": 1,
        }
        assert c.get("/v1/usage", headers=auth("beta")).json()["limits"]["active_experiments"] == 5  # [defaults]
        zero = dict.fromkeys(limits, 0)
        assert usage() == zero

        # datasets
        made = [c.post("/v1/datasets", json={"name": f"d{i}", "target_model": MODEL}, headers=a) for i in range(3)]
        assert [r.status_code for r in made[:2]] == [201, 201]
        quota_refusal(made[2], "datasets", 2, 2)
        ds, spare = made[0].json()["id"], made[1].json()["id"]
        assert usage() == {**zero, "datasets": 2}
        assert len(c.get("/v1/datasets", headers=a).json()["datasets"]) == 2  # nothing of the refused one

        # stored pairs: what fits is stored, the rest rejected naming the quota
        upload = [*items(1, candidates=3, prefix="a"), *items(1, candidates=2, prefix="b")]
        upload += [*items(1, candidates=2, prefix="c"), *items(1, candidates=1, prefix="d")]
        r = c.post(f"/v1/datasets/{ds}/items", json={"items": upload}, headers=a)
        assert r.status_code == 202, r.text
        res = r.json()
        assert res["accepted"] == 3 and res["rejected_total"] == 1 and res["duplicates"] == 0
        assert res["rejected"][0]["index"] == 2 and res["rejected"][0]["id"] == "c0"
        assert "stored_pairs" in res["rejected"][0]["error"]
        assert res["quota"] == {"quota": "stored_pairs", "limit": 6, "usage": 6, "tenant": "alpha"}
        quota_refusal(
            c.post(f"/v1/datasets/{ds}/items", json={"items": items(1, 1, "e")}, headers=a), "stored_pairs", 6, 6
        )
        resent = c.post(f"/v1/datasets/{ds}/items", json={"items": upload[:1]}, headers=a)  # a duplicate is no new pair
        assert resent.status_code == 202 and resent.json()["duplicates"] == 1 and resent.json()["quota"] is None
        assert usage() == {**zero, "datasets": 2, "stored_pairs": 6}
        assert c.delete(f"/v1/datasets/{spare}", headers=a).status_code == 204
        assert usage() == {**zero, "datasets": 1, "stored_pairs": 6}
        wait_done(c, "alpha", ds)

        # an experiment whose arms do not fit the free training-job slots: refused before anything is stored
        r = c.post("/v1/experiments", json=experiment_body(ds, ["grape", "random"]), headers=a)
        quota_refusal(r, "active_training_jobs", 1, 0)
        assert "needs 2" in r.json()["detail"]
        assert list(rclient.scan_iter(match=f"{keys.prefix}:exp*")) == []
        assert list(rclient.scan_iter(match=f"{keys.prefix}:job:*")) == []
        assert c.get("/v1/experiments", headers=a).json()["experiments"] == []
        assert usage() == {**zero, "datasets": 1, "stored_pairs": 6}

        # one arm fits: its job and the base model's evaluation take the tenant's slots
        exp = c.post("/v1/experiments", json=experiment_body(ds, ["grape"]), headers=a)
        assert exp.status_code == 201, exp.text
        full = {"stored_pairs": 6, "datasets": 1, "active_training_jobs": 1, "active_evaluations": 1}
        assert usage() == {**full, "active_experiments": 1}
        quota_refusal(
            c.post("/v1/experiments", json=experiment_body(ds, ["random"]), headers=a), "active_experiments", 1, 1
        )
        quota_refusal(c.post("/v1/training-jobs", json={"dataset_id": ds}, headers=a), "active_training_jobs", 1, 1)
        r = c.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}, headers=a)
        quota_refusal(r, "active_evaluations", 1, 1)
        # another tenant is not held back by alpha's quotas
        assert (
            c.post("/v1/datasets", json={"name": "b", "target_model": MODEL}, headers=auth("beta")).status_code == 201
        )

        # ending frees the slots, exactly
        assert c.post(f"/v1/experiments/{exp.json()['id']}/cancel", headers=a).status_code == 202
        assert usage() == {**zero, "stored_pairs": 6, "datasets": 1}
        job = c.post("/v1/training-jobs", json={"dataset_id": ds}, headers=a)
        assert job.status_code == 201, job.text
        job = job.json()["id"]
        assert usage()["active_training_jobs"] == 1
        assert c.post(f"/v1/training-jobs/{job}/cancel", headers=a).status_code == 202
        assert usage()["active_training_jobs"] == 0
        other = c.post("/v1/training-jobs", json={"dataset_id": ds}, headers=a)
        assert other.status_code == 201
        # a resume counts again: refused while the slot is taken, accepted once it is free
        quota_refusal(c.post(f"/v1/training-jobs/{job}/resume", headers=a), "active_training_jobs", 1, 1)
        assert c.get(f"/v1/training-jobs/{job}", headers=a).json()["state"] == "cancelled"
        assert c.delete(f"/v1/training-jobs/{other.json()['id']}", headers=a).status_code == 204
        assert c.post(f"/v1/training-jobs/{job}/resume", headers=a).json()["state"] == "queued"
        assert usage()["active_training_jobs"] == 1

        ev = c.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}, headers=a)
        assert ev.status_code == 201, ev.text
        assert usage()["active_evaluations"] == 1
        # an evaluation removed by another path (a DELETE route, retention) frees its slot without any counter
        rclient.delete(keys.evaluations.record(ev.json()["id"]))
        assert usage()["active_evaluations"] == 0
        # ... and a list that meets its id drops it from the tenant's index
        assert ev.json()["id"] not in {e["id"] for e in c.get("/v1/evaluations", headers=a).json()["evaluations"]}
        assert rclient.zscore(keys.tenant_ids("alpha", "evals"), ev.json()["id"]) is None

        assert c.delete(f"/v1/datasets/{ds}", headers=a).status_code == 204
        assert usage() == {**zero, "active_training_jobs": 1}

        # the admin sees every tenant's usage and limits
        every = c.get("/v1/usage", headers=auth("ops")).json()
        assert every["admin"] is True and every["tenant"] == "ops"
        rows = {t["tenant"]: t for t in every["tenants"]}
        assert {"alpha", "beta", "ops"} <= set(rows)
        assert rows["alpha"]["usage"] == usage() and rows["alpha"]["limits"] == limits
        assert rows["beta"]["usage"]["datasets"] == 1


def test_concurrent_uploads_never_overshoot_the_stored_pairs_quota(redis_url, keys, monkeypatch, capsys) -> None:
    """Eight uploads at once into one tenant's datasets, on a real gateway process: exactly the quota is stored."""
    proc, url = start_gateway(
        redis_url,
        keys,
        GRAPE_API_KEYS=API_KEYS,
        GRAPE_QUOTA_STORED_PAIRS="50",
        GRAPE_MAX_CONCURRENT_UPLOADS="8",
        GRAPE_CHUNK_PAIRS="4",
    )
    try:
        with httpx.Client(base_url=url, headers=auth("alpha"), timeout=60) as c:
            dss = [c.post("/v1/datasets", json={"name": "d", "target_model": MODEL}).json()["id"] for _ in range(2)]

            def upload(i: int) -> dict[str, Any]:
                r = c.post(f"/v1/datasets/{dss[i % 2]}/items", json={"items": items(10, 1, f"u{i}-")})
                return {"status": r.status_code, **r.json()}

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(upload, range(8)))
            accepted = sum(a.get("accepted", 0) for a in answers)
            assert accepted == 50, answers
            assert all(a["status"] in (202, 403) for a in answers), answers
            stored = sum(c.get(f"/v1/datasets/{d}").json()["candidates"] for d in dss)
            assert stored == 50 and c.get("/v1/usage").json()["usage"]["stored_pairs"] == 50
        # `grape usage` prints the same
        monkeypatch.setenv("GRAPE_API_KEY", KEYS["alpha"])
        assert cli_main(["usage", "--url", url]) == 0
        header, row = capsys.readouterr().out.splitlines()
        assert header.split() == ["tenant", *QUOTAS] and row.split()[:4] == ["alpha", "50", "/", "50"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_tenants_file_and_the_keys_are_checked_at_start(redis_url, keys, tmp_path) -> None:
    defaults = Settings().default_quotas()
    assert parse_quotas({"tenants": {"a": {"datasets": 3}}}, defaults) == Quotas(defaults, {"a": {"datasets": 3}})
    for doc, words in [
        ({"tenants": {"a": {"datasets_max": 3}}}, "unknown quota 'datasets_max'"),
        ({"defaults": {"gpus": 1}}, "unknown quota 'gpus'"),
        ({"tenants": {"Bad Name": {}}}, "a tenant is 1-32 characters"),
        ({"tenants": {"a": {"datasets": -1}}}, "non-negative integer"),
        ({"limits": {}}, "unknown table 'limits'"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_quotas(doc, defaults)
    bad = tenants_file(tmp_path, "[tenants.alpha]\nstored_pair = 5\n")
    with pytest.raises(ValueError, match="GRAPE_TENANTS_FILE .*unknown quota 'stored_pair'"):
        create_app(app_settings(redis_url, keys, tenants_file=bad))
    for api_keys, words in [
        ("Alpha:k1", "GRAPE_API_KEYS: entry 1 names the tenant 'Alpha'"),
        ("a:k1,b:", "entry 2 .* has an empty key"),
        ("a:k1,b:k1", "repeats a key"),
    ]:
        with pytest.raises(ValueError, match=words) as info:
            Settings(api_keys=api_keys)
        assert "k1" not in str(info.value).replace("entry", "")  # the keys themselves are never shown
    s = Settings(api_keys="k0, alpha:k1", admin_keys="ops:k2,k3")
    assert s.key_entries() == [
        ("default", "k0", False),
        ("alpha", "k1", False),
        ("ops", "k2", True),
        ("default", "k3", True),
    ]


def test_bare_keys_are_tenant_default_and_records_made_before_tenants_are_its(redis_url, keys, rclient) -> None:
    """Today's deployments keep working: a bare key is tenant `default`, which owns every record without a
    tenant (adopted at start: listed, counted); local mode is one user, `default`, who sees everything."""
    rclient.hset(
        keys.dataset("ds-0000000000aa"),
        mapping={"name": "old", "target_model": MODEL, "template": "auto", "created": "1"},
    )
    rclient.zadd(keys.datasets(), {"ds-0000000000aa": 1})
    rclient.hset(keys.stats("ds-0000000000aa"), mapping={"items": 2, "candidates": 5})
    rclient.hset(keys.training.record("job-0000000000aa"), mapping={"id": "job-0000000000aa", "state": "queued"})
    rclient.zadd(keys.training.ids(), {"job-0000000000aa": 1})
    s = Settings(redis_url=redis_url, key_prefix=keys.prefix, api_keys="old-bare-key,alpha:ak")
    with TestClient(create_app(s)) as c:
        old, alpha = {"Authorization": "Bearer old-bare-key"}, {"Authorization": "Bearer ak"}
        deadline = time.monotonic() + 10
        while c.get("/v1/usage", headers=old).json()["usage"]["stored_pairs"] != 5:
            assert time.monotonic() < deadline, "the records made before tenants were not adopted"
            time.sleep(0.1)
        u = c.get("/v1/usage", headers=old).json()
        assert u["tenant"] == "default" and u["usage"]["datasets"] == 1 and u["usage"]["active_training_jobs"] == 1
        assert [d["id"] for d in c.get("/v1/datasets", headers=old).json()["datasets"]] == ["ds-0000000000aa"]
        assert c.get("/v1/datasets/ds-0000000000aa", headers=old).json()["tenant"] == "default"
        assert c.get("/v1/datasets", headers=alpha).json()["datasets"] == []
        assert c.get("/v1/datasets/ds-0000000000aa", headers=alpha).status_code == 404
    with TestClient(create_app(Settings(redis_url=redis_url, key_prefix=keys.prefix))) as local:
        u = local.get("/v1/usage").json()
        assert u["tenant"] == "default" and u["admin"] is True
        assert len(local.get("/v1/datasets").json()["datasets"]) == 1


# the follow limit counts per matched key ----------------------------------------------------------------
def test_the_follow_limit_counts_the_key_however_its_header_is_spelled(redis_url, keys, rclient, evaluator) -> None:
    proc, url = start_gateway(redis_url, keys, GRAPE_API_KEYS=API_KEYS, GRAPE_MAX_LOG_FOLLOWERS="2")
    key = KEYS["alpha"]
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}, headers=auth("alpha"))
            assert r.status_code == 201, r.text  # queued: no evaluator runs it, so followers stay open
            path = f"/v1/evaluations/{r.json()['id']}/logs?follow=true"
            with c.stream("GET", path, headers=auth("alpha")) as s1, c.stream("GET", path, headers=auth("alpha")) as s2:
                assert s1.status_code == s2.status_code == 200
                for spelling in (f"bearer {key}", f"BEARER {key}", f"Bearer  {key}"):
                    with c.stream("GET", path, headers={"Authorization": spelling}) as r:
                        assert r.status_code == 429, (spelling, r.status_code)  # before: 200, 4 more per spelling
                        assert "GRAPE_MAX_LOG_FOLLOWERS" in r.read().decode()
                # another key (of the same tenant) has its own streams
                with c.stream("GET", path, headers=auth("alpha2")) as other:
                    assert other.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# deletion of evaluations and experiments, inside the tenant -------------------------------------------
def test_ended_evaluations_and_experiments_are_deleted_by_their_tenant_or_an_admin_only(
    gw, null_worker, evaluator, rclient, keys
) -> None:
    c = gw
    ds = scored_dataset(c, "beta")  # 3 items of 2 candidates
    made: dict[str, list[str]] = {"ev": [], "exp": []}
    for _ in range(2):  # one for beta to delete, one for the admin
        ev = c.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}, headers=auth("beta")).json()["id"]
        assert c.post(f"/v1/evaluations/{ev}/cancel", headers=auth("beta")).json()["state"] == "cancelled"
        exp = c.post("/v1/experiments", json=experiment_body(ds, ["grape"]), headers=auth("beta"))
        assert exp.status_code == 201, exp.text
        exp = exp.json()["id"]
        assert c.post(f"/v1/experiments/{exp}/cancel", headers=auth("beta")).json()["state"] == "cancelled"
        made["ev"].append(ev)
        made["exp"].append(exp)
    (ev, ev_admin), (exp, exp_admin) = made["ev"], made["exp"]
    arm_job = c.get(f"/v1/experiments/{exp}", headers=auth("beta")).json()["arms"][0]["job_id"]
    base_eval = c.get(f"/v1/experiments/{exp}", headers=auth("beta")).json()["base"]["eval_id"]

    def usage(who: str) -> dict[str, int]:
        r = c.get("/v1/usage", headers=auth(who))
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    ended = {"stored_pairs": 6, "datasets": 1, "active_training_jobs": 0, "active_evaluations": 0}
    assert usage("beta") == {**ended, "active_experiments": 0}

    def snapshot() -> list[Any]:
        views = [c.get(f"/v1/evaluations/{i}", headers=auth("beta")).json() for i in made["ev"]]
        views += [c.get(f"/v1/experiments/{i}", headers=auth("beta")).json() for i in made["exp"]]
        raw = [rclient.hgetall(keys.evaluations.record(i)) for i in made["ev"]]
        raw += [rclient.get(keys.experiment(i)) for i in made["exp"]]
        raw += [rclient.zrange(keys.tenant_ids("beta", kind), 0, -1) for kind in ("evals", "experiments", "jobs")]
        return [*views, *raw, rclient.exists(keys.experiment_selection(exp, 0))]

    before = snapshot()
    # ended, so the owner could delete them: another tenant gets the unknown id's 404 and nothing changes
    for path, real, unknown in [
        ("/v1/evaluations/{}", ev, UNKNOWN["ev"]),
        ("/v1/experiments/{}", exp, UNKNOWN["exp"]),
        ("/v1/experiments/{}?with_runs=true", exp, UNKNOWN["exp"]),
    ]:
        cross = c.delete(path.format(real), headers=auth("alpha"))
        assert cross.status_code == 404, cross.text
        same_as_unknown(cross, real, c.delete(path.format(unknown), headers=auth("alpha")), unknown)
    assert snapshot() == before, "another tenant's DELETE changed the resource"
    assert usage("alpha") == dict.fromkeys(ended | {"active_experiments": 0}, 0)

    # the owner deletes its own: 204, gone from its lists, its tenant index and nothing changes in its usage
    assert c.delete(f"/v1/evaluations/{ev}", headers=auth("beta")).status_code == 204
    assert c.delete(f"/v1/experiments/{exp}", params={"with_runs": "true"}, headers=auth("beta")).status_code == 204
    for path in (f"/v1/evaluations/{ev}", f"/v1/experiments/{exp}", f"/v1/training-jobs/{arm_job}"):
        assert c.get(path, headers=auth("beta")).status_code == 404, path
    evals = {e["id"] for e in c.get("/v1/evaluations", headers=auth("beta")).json()["evaluations"]}
    exps = {e["id"] for e in c.get("/v1/experiments", headers=auth("beta")).json()["experiments"]}
    jobs = {j["id"] for j in c.get("/v1/training-jobs", headers=auth("beta")).json()["jobs"]}
    assert ev not in evals and base_eval not in evals and ev_admin in evals
    assert exps == {exp_admin} and arm_job not in jobs and len(jobs) == 1  # the admin's experiment's arm
    assert rclient.zscore(keys.tenant_ids("beta", "evals"), ev) is None
    assert rclient.zscore(keys.tenant_ids("beta", "evals"), base_eval) is None
    assert rclient.zscore(keys.tenant_ids("beta", "experiments"), exp) is None
    assert rclient.zscore(keys.tenant_ids("beta", "jobs"), arm_job) is None
    assert usage("beta") == {**ended, "active_experiments": 0}

    # the admin deletes another tenant's
    assert c.delete(f"/v1/evaluations/{ev_admin}", headers=auth("ops")).status_code == 204
    assert c.delete(f"/v1/experiments/{exp_admin}", headers=auth("ops")).status_code == 204
    assert c.get(f"/v1/evaluations/{ev_admin}", headers=auth("beta")).status_code == 404
    assert c.get(f"/v1/experiments/{exp_admin}", headers=auth("beta")).status_code == 404
    assert c.get("/v1/experiments", headers=auth("beta")).json()["experiments"] == []
    assert rclient.zrange(keys.tenant_ids("beta", "experiments"), 0, -1) == []
    assert usage("beta") == {**ended, "active_experiments": 0}


# fair share across tenants ----------------------------------------------------------------------------
def test_a_tenants_400_pairs_are_scored_while_another_tenants_big_dataset_is_less_than_half_done(
    redis_url, keys, rclient, model_path
) -> None:
    """alpha uploads 4,000 pairs, beta 400 afterwards (while two null workers score alpha's first batches): beta
    is done while alpha is less than half scored. Counted, not timed: the backends (tests.test_fair_share's
    Recorder) hold every call after beta's last pair until the counts in Redis have been read."""
    s = app_settings(redis_url, keys).model_copy(update={"chunk_pairs": 8})
    rec = Recorder(load_backend("null", BackendConfig(model=model_path)), "B", 400)
    workers = [Worker(rclient, keys, MODEL, rec, block_ms=100, name=f"null-{i}", read_count=2) for i in range(2)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    with TestClient(create_app(s)) as c:

        def upload(who: str, tag: str, n: int) -> str:
            ds = c.post("/v1/datasets", json={"name": tag, "target_model": MODEL}, headers=auth(who)).json()["id"]
            r = c.post(f"/v1/datasets/{ds}/items", json={"items": _items(tag, n)}, headers=auth(who))
            assert r.status_code == 202 and r.json()["accepted"] == n, r.text
            return ds

        big = upload("alpha", "A", 2000)  # 4,000 pairs in 500 chunks
        try:
            for t in threads:
                t.start()
            assert rec.started(120), "no worker started scoring"
            small = upload("beta", "B", 200)  # 400 pairs in 50 chunks, while the workers hold alpha's
            rec.go()
            try:
                wait_done(c, "beta", small, timeout=300)
                at_small_done = c.get(f"/v1/datasets/{big}", headers=auth("alpha")).json()
            finally:
                rec.release()
            assert c.get(f"/v1/datasets/{small}", headers=auth("beta")).json()["scored_candidates"] == 400
            assert at_small_done["scored_candidates"] < 4000 / 2, at_small_done
            assert rec.at_small_done is not None and rec.at_small_done.get("A", 0) < 4000 / 2, rec.at_small_done
            wait_done(c, "alpha", big, timeout=300)
        finally:
            rec.go()
            rec.release()
            for w in workers:
                w.stop()
            for t in threads:
                t.join(timeout=60)
        done = c.get(f"/v1/datasets/{big}", headers=auth("alpha")).json()
        assert (done["scored_candidates"], done["failed_items"], rec.pairs) == (4000, 0, {"A": 4000, "B": 400})
        assert c.get("/v1/usage", headers=auth("alpha")).json()["usage"]["stored_pairs"] == 4000
        assert c.get("/v1/usage", headers=auth("beta")).json()["usage"]["stored_pairs"] == 400


# retention per tenant ----------------------------------------------------------------------------------
def test_retention_expires_a_tenants_ended_resources_and_leaves_the_others_unended_ones(
    redis_url, keys, rclient, null_worker, evaluator
) -> None:
    """GRAPE_RETENTION_DAYS=0.00002 (1.7 s), as tests/test_lifecycle.py drives it: the gateway's background pass
    removes alpha's ended evaluation and experiment (with its arm's job and base evaluation) from alpha's tenant
    index, alpha's usage stays exact; beta's queued ones, as old, stay."""
    s = app_settings(redis_url, keys, retention_days=0.00002, experiment_poll_s=0.2)
    with TestClient(create_app(s)) as c:
        own: dict[str, dict[str, str]] = {}
        for who in ("alpha", "beta"):
            ds = scored_dataset(c, who)
            ev = c.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK]}, headers=auth(who))
            exp = c.post("/v1/experiments", json=experiment_body(ds, ["grape"]), headers=auth(who))
            assert ev.status_code == exp.status_code == 201, (ev.text, exp.text)
            own[who] = {"ds": ds, "ev": ev.json()["id"], "exp": exp.json()["id"]}
        a, b = own["alpha"], own["beta"]
        assert c.post(f"/v1/evaluations/{a['ev']}/cancel", headers=auth("alpha")).json()["state"] == "cancelled"
        exp = c.post(f"/v1/experiments/{a['exp']}/cancel", headers=auth("alpha")).json()
        assert exp["state"] == "cancelled"
        a_job, a_base = exp["arms"][0]["job_id"], exp["base"]["eval_id"]
        b_exp = c.get(f"/v1/experiments/{b['exp']}", headers=auth("beta")).json()
        b_job, b_base = b_exp["arms"][0]["job_id"], b_exp["base"]["eval_id"]
        t_ended = time.monotonic()

        def indexed(who: str, kind: str) -> set[str]:
            return {i.decode() for i in rclient.zrange(keys.tenant_ids(who, kind), 0, -1)}

        def expired() -> bool:
            return indexed("alpha", "evals") == indexed("alpha", "experiments") == indexed("alpha", "jobs") == set()

        deadline = time.monotonic() + 30
        while not expired():  # nothing reads them meanwhile: only the background pass removes them
            assert time.monotonic() < deadline, (indexed("alpha", "evals"), indexed("alpha", "experiments"))
            time.sleep(0.1)
        assert time.monotonic() - t_ended > 1.7
        for path in (f"/v1/evaluations/{a['ev']}", f"/v1/evaluations/{a_base}", f"/v1/experiments/{a['exp']}"):
            assert c.get(path, headers=auth("alpha")).status_code == 404, path
        assert not rclient.exists(keys.evaluations.record(a["ev"]), keys.experiment(a["exp"]))
        assert not rclient.exists(keys.experiment_selection(a["exp"], 0))
        assert c.get(f"/v1/training-jobs/{a_job}", headers=auth("alpha")).status_code == 404
        # alpha's dataset has not "ended": it stays, and alpha's usage is exactly it
        assert indexed("alpha", "datasets") == {a["ds"]}
        usage = c.get("/v1/usage", headers=auth("alpha")).json()["usage"]
        zero = dict.fromkeys(usage, 0)
        assert usage == {**zero, "stored_pairs": 6, "datasets": 1}

        # beta's, as old, have not ended: they stay, listed, indexed and counted
        assert indexed("beta", "evals") == {b["ev"], b_base} and indexed("beta", "experiments") == {b["exp"]}
        assert indexed("beta", "jobs") == {b_job} and indexed("beta", "datasets") == {b["ds"]}
        assert c.get(f"/v1/evaluations/{b['ev']}", headers=auth("beta")).json()["state"] == "queued"
        b_state = ExperimentState(c.get(f"/v1/experiments/{b['exp']}", headers=auth("beta")).json()["state"])
        assert b_state not in TERMINAL, b_state
        listed = c.get("/v1/evaluations", headers=auth("beta")).json()["evaluations"]
        assert {e["id"] for e in listed} == {b["ev"], b_base}
        assert c.get("/v1/usage", headers=auth("beta")).json()["usage"] == {
            "stored_pairs": 6,
            "datasets": 1,
            "active_training_jobs": 1,
            "active_evaluations": 2,
            "active_experiments": 1,
        }
