"""The deployment files: the compose file through a real Compose parser, the Kubernetes manifests by kind.

Compose: Debian's `docker-compose` (1.29, installed by the test when missing) parses, interpolates and
validates the file against the Compose specification's schema with `config`, and needs no Docker engine
(none runs here). Its output, with every anchor merged and variable substituted, is what is checked.
Kubernetes: PyYAML parses every manifest; the kinds, GPU requests, probes and the names they refer to
are checked (no cluster here either).
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import yaml

from grape.settings import Settings
from tests.conftest import ROOT
from tests.system_packages import ensure_binary

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / "grape.env.example"
K8S = ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def docker_compose() -> str:
    return ensure_binary("docker-compose", "docker-compose")


def compose(binary: str, *args: str, env_file: Path | None = ENV_EXAMPLE, cwd: Path = ROOT):
    # a clean environment: values must come from the env file, not from whoever runs the test
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRAPE_", "COMPOSE_")) and k != "HF_TOKEN"}
    cmd = [binary, "--project-directory", str(cwd)]
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _mount(v: str | dict) -> tuple[str, str]:
    """(target, source) of a volume in short (`src:dst[:mode]`) or long syntax."""
    if isinstance(v, dict):
        return v["target"], v["source"]
    source, target = v.split(":")[:2]
    return target, source


def test_compose_file_is_valid_for_a_real_compose_parser(docker_compose) -> None:
    proc = compose(docker_compose, "-f", str(COMPOSE), "config")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    services = cfg["services"]
    assert {"redis", "gateway", "worker", "trainer"} <= services.keys()

    redis_svc = services["redis"]
    assert redis_svc["image"].startswith("redis:7")
    assert redis_svc["command"] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    mounts = dict(_mount(v) for v in redis_svc["volumes"])
    assert Path(mounts["/usr/local/etc/redis/redis.conf"]) == ROOT / "deploy" / "redis.conf"
    assert mounts["/data"] == "redis-data" and "redis-data" in cfg["volumes"]

    gateway = services["gateway"]
    assert gateway["build"]["dockerfile"] == "deploy/Dockerfile.gateway"
    assert gateway["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert gateway["environment"]["GRAPE_HOST"] == "0.0.0.0"
    assert gateway["environment"]["GRAPE_API_KEYS"]  # a gateway on all interfaces must have keys
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(p["target"] == 8000 for p in gateway["ports"])

    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile.worker"
    assert worker["command"][:3] == ["worker", "--model", "Qwen/Qwen2.5-7B"]  # from the env file
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert (gpu["driver"], gpu["count"], gpu["capabilities"]) == ("nvidia", 1, ["gpu"])
    # scalable with --scale: no fixed container name, no published host port
    assert "container_name" not in worker and "ports" not in worker
    assert worker["environment"]["GRAPE_METRICS_PORT"] == "9400"
    assert "/ready" in " ".join(worker["healthcheck"]["test"])

    # one service per GPU, each picking its device with CUDA_VISIBLE_DEVICES
    per_gpu = {name: s for name, s in services.items() if name.startswith("worker-gpu")}
    assert sorted(s["environment"]["CUDA_VISIBLE_DEVICES"] for s in per_gpu.values()) == [str(i) for i in range(8)]
    for name, s in per_gpu.items():
        assert s["command"] == worker["command"], name
        assert s["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    by_profile = Counter(p for s in per_gpu.values() for p in s["profiles"])
    assert by_profile == {"gpus-2": 2, "gpus-4": 4, "gpus-8": 8}

    trainer = services["trainer"]
    assert trainer["command"] == ["trainer"]
    assert trainer["profiles"] == ["train"]
    assert trainer["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_compose_parser_rejects_what_the_spec_does_not_allow(docker_compose, tmp_path) -> None:
    """The parser really validates: an unknown key and a missing required variable both fail."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  gateway:\n    image: x\n    replicas_typo: 2\n")
    proc = compose(docker_compose, "-f", str(bad), "config", "-q", env_file=None, cwd=tmp_path)
    assert proc.returncode != 0 and "replicas_typo" in proc.stderr
    # with nothing set, the target model and the API keys are required, with a message saying where
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = compose(docker_compose, "-f", str(COMPOSE), "config", "-q", env_file=empty, cwd=ROOT)
    assert proc.returncode != 0 and "deploy/grape.env.example" in proc.stderr


def test_dockerfiles_copy_every_package_and_install_the_project() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    for name in ("Dockerfile.gateway", "Dockerfile.worker"):
        text = (ROOT / "deploy" / name).read_text()
        copied = set(re.findall(r"^COPY (\S+)", text, flags=re.M))
        for pkg in packages:
            assert pkg in copied, f"{name} does not copy {pkg}/"
            assert (ROOT / pkg).is_dir()
        assert "pyproject.toml" in text and re.search(r"pip install .*\.", text), name
        assert re.search(r'^ENTRYPOINT \["grape"\]', text, flags=re.M), name
    assert "python:3.11-slim" in (ROOT / "deploy" / "Dockerfile.gateway").read_text()
    assert "vllm" in (ROOT / "deploy" / "Dockerfile.worker").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".env" in ignored


def _manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["_file"] = path.name
                docs.append(doc)
    return docs


def _one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_kubernetes_manifests_parse_with_the_expected_kinds() -> None:
    docs = _manifests()
    kinds = Counter(d["kind"] for d in docs)
    assert kinds == {
        "ConfigMap": 2,  # settings, redis.conf
        "Secret": 1,
        "Service": 2,  # redis (headless), gateway
        "StatefulSet": 1,
        "Deployment": 3,  # gateway, worker, evaluator
        "PersistentVolumeClaim": 1,
        "Job": 1,
        "ScaledObject": 1,  # KEDA: the workers on their queue (tests/test_scaling.py)
    }
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"].startswith("grape-"), d["_file"]
        assert "namespace" not in d["metadata"], d["_file"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    assert kustomization["kind"] == "Kustomization"

    # every workload's selector matches its pod labels; every Service selects some workload's pods
    pods = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), d["metadata"]["name"]
            pods[d["metadata"]["name"]] = labels
    for svc in (d for d in docs if d["kind"] == "Service"):
        sel = svc["spec"]["selector"].items()
        assert any(sel <= labels.items() for labels in pods.values()), svc["metadata"]["name"]

    # configuration only through the ConfigMap and the Secret, and those exist
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ("ConfigMap", ref["configMapRef"]["name"]) in names
                if "secretRef" in ref:
                    assert ("Secret", ref["secretRef"]["name"]) in names
    assert "GRAPE_API_KEYS" in _one(docs, "Secret", "grape-secrets")["stringData"]


def test_kubernetes_workloads_have_gpus_probes_and_volumes() -> None:
    docs = _manifests()
    redis_set = _one(docs, "StatefulSet", "grape-redis")
    assert redis_set["spec"]["serviceName"] == "grape-redis"
    assert redis_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    (redis_c,) = redis_set["spec"]["template"]["spec"]["containers"]
    assert {m["mountPath"] for m in redis_c["volumeMounts"]} == {"/data", "/etc/redis"}
    assert redis_c["args"] == ["redis-server", "/etc/redis/redis.conf"]

    gateway = _one(docs, "Deployment", "grape-gateway")
    (gw,) = gateway["spec"]["template"]["spec"]["containers"]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["image"].startswith("grape-select/gateway")

    worker = _one(docs, "Deployment", "grape-worker")
    (wk,) = worker["spec"]["template"]["spec"]["containers"]
    assert wk["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert wk["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert wk["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert {p["name"]: p["containerPort"] for p in wk["ports"]} == {"metrics": 9400}
    assert wk["args"][:3] == ["worker", "--model", "$(GRAPE_TARGET_MODEL)"]
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9400"

    job = _one(docs, "Job", "grape-trainer")
    (tr,) = job["spec"]["template"]["spec"]["containers"]
    assert tr["args"] == ["trainer"]
    assert tr["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in {(d["kind"], d["metadata"]["name"]) for d in docs}


def _directives(conf: str) -> list[str]:
    return [line.strip() for line in conf.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_redis_configuration_is_the_same_everywhere() -> None:
    conf = (ROOT / "deploy" / "redis.conf").read_text()
    directives = _directives(conf)
    assert "appendonly yes" in directives and "appendfsync everysec" in directives
    assert "maxmemory-policy noeviction" in directives
    assert any(d.startswith("maxmemory ") for d in directives)
    k8s = _one(_manifests(), "ConfigMap", "grape-redis-config")["data"]["redis.conf"]
    assert _directives(k8s) == directives, "deploy/k8s/redis.yaml's redis.conf differs from deploy/redis.conf"


def _documented_variables() -> set[str]:
    """Every variable named in the documentation: the README and the site (docs/, its reference pages included)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return set(re.findall(r"\b((?:GRAPE|REDIS|HF)_[A-Z_]+)\b", "\n".join(p.read_text() for p in pages)))


def test_deployment_variables_are_real_settings_and_documented() -> None:
    """A typo in a variable name would be silently ignored by the settings: catch it here."""
    fields = {f"GRAPE_{name.upper()}" for name in Settings.model_fields} | {"REDIS_URL"}
    # substituted into the compose file or a build argument, not read by grape itself
    deploy_only = {
        "GRAPE_TARGET_MODEL",
        "GRAPE_GATEWAY_PORT",
        "GRAPE_IMAGE_TAG",
        "GRAPE_GPU_MEMORY_UTILIZATION",
        "GRAPE_TENSOR_PARALLEL_SIZE",
        "GRAPE_EXTRAS",
    }
    example = {
        line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    }
    compose_text = COMPOSE.read_text()
    in_compose = set(re.findall(r"\b((?:GRAPE|REDIS)_[A-Z_]+)\b", compose_text))
    config = _one(_manifests(), "ConfigMap", "grape-config")["data"]
    in_k8s = {k for k in config if k.startswith(("GRAPE_", "REDIS_"))}
    documented = _documented_variables()
    for source, names in (("grape.env.example", example), ("docker-compose.yml", in_compose), ("k8s", in_k8s)):
        grape_names = {n for n in names if n.startswith(("GRAPE_", "REDIS_"))}
        unknown = grape_names - fields - deploy_only
        assert not unknown, f"{source}: not a setting: {sorted(unknown)}"
        undocumented = grape_names - documented
        assert not undocumented, f"{source}: not in the docs: {sorted(undocumented)}"
    # every variable the compose file substitutes has a value in the example env file
    substituted = set(re.findall(r"\$\{([A-Z_]+)", compose_text))
    assert substituted <= example, sorted(substituted - example)
