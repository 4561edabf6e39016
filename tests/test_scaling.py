"""Workers that scale with the queue (issue 20): the manifests validated against the Kubernetes schemas, KEDA's
ScaledObject on the very stream and group the workers read, and a scale-down (SIGTERM) mid-chunk that loses and
doubles nothing.

The built-in kinds are validated strictly by `kubernetes-validate` (the Kubernetes OpenAPI schemas, offline;
strict: an unknown field fails). KEDA's ScaledObject is a custom resource whose schema is not in those, so
its structure is checked explicitly here against the fields of KEDA's CRD (keda.sh/v1alpha1, KEDA >= 2.11).
"""

from __future__ import annotations

import copy
import signal
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import redis
import yaml
from fastapi.testclient import TestClient

from grape.keys import GROUP, Keys
from grape.settings import Settings
from service.app import create_app
from tests.conftest import MODEL, ROOT, create, load_pool, wait_done
from tests.test_faults import assert_every_candidate_scored_once, kill_group, spawn_worker, wait_for

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"

# the fields KEDA's ScaledObject CRD (v2.11+) accepts, and those of a redis-streams trigger
SCALED_OBJECT_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
    "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}  # fmt: skip
REDIS_STREAMS_METADATA = {
    "address", "host", "port", "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup",
    "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount", "databaseIndex", "enableTLS",
    "unsafeSsl",
}  # fmt: skip


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def one(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_every_builtin_manifest_validates_strictly_against_the_kubernetes_schemas() -> None:
    builtin = [(f, d) for f, d in manifests() if not d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for _, d in builtin} >= {"Deployment", "StatefulSet", "Job", "Service", "ConfigMap", "Secret"}
    for name, doc in builtin:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc.message}") from exc
    # the validator really validates: a misspelt field and a wrong type both fail
    bad = copy.deepcopy(one("Deployment", "grape-worker"))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 120
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    bad = copy.deepcopy(one("Deployment", "grape-evaluator"))
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_the_scaled_object_scales_the_workers_on_the_stream_and_group_they_read() -> None:
    obj = one("ScaledObject", "grape-worker")
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    spec = obj["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC, set(spec) - SCALED_OBJECT_SPEC
    target = spec["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    worker = one("Deployment", target["name"])
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["worker", "--model", "$(GRAPE_TARGET_MODEL)"]
    assert "--task" not in container["args"]  # the default task, logprob: the stream below
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
    assert isinstance(spec["pollingInterval"], int) and isinstance(spec["cooldownPeriod"], int)

    # what the workers read, derived as they derive it: the ConfigMap's prefix and model through grape.keys
    config = one("ConfigMap", "grape-config")["data"]
    # (workers.loop.Worker reads `score_queue(task, model).stream`; the deployed workers score the logprob task)
    stream = Keys(config["GRAPE_KEY_PREFIX"]).score_queue("logprob", config["GRAPE_TARGET_MODEL"]).stream
    redis_url = urlparse(config["REDIS_URL"])
    triggers = spec["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    for t in triggers:
        meta = t["metadata"]
        assert set(meta) <= REDIS_STREAMS_METADATA, set(meta) - REDIS_STREAMS_METADATA
        assert all(isinstance(v, str) for v in meta.values()), "KEDA's trigger metadata are strings"
        assert (meta["stream"], meta["consumerGroup"]) == (stream, GROUP)
        assert meta["address"] == f"{redis_url.hostname}:{redis_url.port}"
    by_name = {t["name"]: t["metadata"] for t in triggers}
    lag, pending = by_name["queue-lag"], by_name["queue-pending"]
    # lag is the only metric that reaches zero replicas and wakes them again, on one undelivered chunk
    assert int(lag["lagCount"]) >= 1 and lag["activationLagCount"] == "0"
    assert "pendingEntriesCount" not in lag and "lagCount" not in pending
    # pending: a worker per GRAPE_READ_COUNT chunks held, so the workers holding the last chunks stay
    assert int(pending["pendingEntriesCount"]) == int(config["GRAPE_READ_COUNT"])

    # scale-down: the pod's grace covers the batch in hand (docs/operator/scaling.md: two minutes for a 7B batch of
    # GRAPE_BATCH_TOKENS); a worker is handed its stop no faster than one per policy period
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 120
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]


def test_the_evaluator_runs_beside_the_trainer_on_its_volume() -> None:
    evaluator = one("Deployment", "grape-evaluator")
    pod = evaluator["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["evaluator"] and c["image"].startswith("grape-select/evaluator")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    job = one("Job", "grape-trainer")
    train_claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"]["claimName"] == train_claim
    (trainer_c,) = job["spec"]["template"]["spec"]["containers"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {m["mountPath"] for m in trainer_c["volumeMounts"]}
    # its own variables are settings (a typo would be ignored silently) and documented
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["GRAPE_EVAL_TASK_DIR"].startswith("/data/")
    fields = {f"GRAPE_{n.upper()}" for n in Settings.model_fields}
    docs = "\n".join(p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))
    for name in env:
        assert name in fields and name in docs, name
    assert {r["configMapRef"]["name"] for r in c["envFrom"] if "configMapRef" in r} == {"grape-config"}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {"evaluator.yaml", "worker-scaler.yaml"} <= set(kustomization["resources"])
    assert "grape-select/evaluator" in {i["name"] for i in kustomization["images"]}


def _group(rclient: redis.Redis, stream: str) -> dict | None:
    try:
        groups = rclient.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream
        return None
    return next((g for g in groups if g["name"].decode() == GROUP), None)


def test_the_gateway_creates_the_workers_group_with_the_dataset(api, rclient, keys) -> None:
    """KEDA reads the group's lag; without the group (no worker ever ran: scaled to zero) it cannot wake them
    (kedacore/keda#7447). The gateway makes it when a dataset is created, before any upload."""
    stream = keys.stream(MODEL)
    assert _group(rclient, stream) is None
    ds = create(api)
    group = _group(rclient, stream)
    assert group is not None and group["lag"] == 0 and group["pending"] == 0
    create(api)  # a second dataset on the same model: the existing group is no error
    items = load_pool(3, start=300, max_chars=200, candidates=2)
    assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 3
    assert _group(rclient, stream)["lag"] >= 1  # what wakes the workers from zero


def test_scale_down_mid_chunk_loses_and_doubles_nothing(redis_url, rclient, keys, tmp_path) -> None:
    """Two real worker processes score a dataset of several chunks (fair share: most wait in the backlog); the
    one holding a chunk it has partly written gets SIGTERM, as a scale-down does. It finishes its batch, hands
    back the rest and exits 0; the other finishes the dataset; every candidate is scored exactly once."""
    items = load_pool(12, start=330, max_chars=250, candidates=3)
    settings = Settings(redis_url=redis_url, key_prefix=keys.prefix, chunk_pairs=6, fair_share_window=2)
    names = ["stays", "goes"]
    # small slices (GRAPE_COMMIT_TOKENS) so the stopped worker has written part of its chunk when told to stop
    procs = {
        n: spawn_worker(redis_url, keys, tmp_path, n, GRAPE_COMMIT_TOKENS="256", GRAPE_READ_COUNT="1") for n in names
    }
    try:
        with TestClient(create_app(settings)) as api:
            for n, p in procs.items():
                wait_for(lambda n=n: rclient.exists(keys.worker(n)), 300, f"{n} starts", p, tmp_path / f"{n}.log")
            ds = create(api)
            assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 12

            def goes_mid_chunk() -> bool:
                pending = rclient.xpending_range(keys.stream(MODEL), GROUP, min="-", max="+", count=10)
                held = [p for p in pending if p["consumer"] == b"goes"]
                return bool(held) and rclient.hlen(keys.scores(ds)) >= 1

            wait_for(goes_mid_chunk, 300, "the stopped worker holds a chunk", procs["goes"], tmp_path / "goes.log")
            assert api.get(f"/v1/datasets/{ds}").json()["scored_items"] < 12, "done before the stop: proves nothing"
            procs["goes"].send_signal(signal.SIGTERM)
            assert procs["goes"].wait(timeout=120) == 0
            assert "stopping after the current batch" in (tmp_path / "goes.log").read_text()
            # nothing is left on the stopped worker: what it held is scored or back in the queue
            pending = rclient.xpending_range(keys.stream(MODEL), GROUP, min="-", max="+", count=100)
            assert all(p["consumer"] != b"goes" for p in pending), pending
            st = wait_done(api, ds, timeout=600)
            assert st["state"] == "done"
            assert_every_candidate_scored_once(api, rclient, keys, ds, items)
            assert rclient.llen(keys.backlog(ds, "logprob")) == 0
            # what lets KEDA scale to zero: the lag stays exact through the acks' and hand-back's deletions
            group = _group(rclient, keys.stream(MODEL))
            assert (group["lag"], group["pending"]) == (0, 0)
            assert int(rclient.get(keys.score_queue("logprob", MODEL).waiting) or 0) == 0
    finally:
        for p in procs.values():
            kill_group(p)
