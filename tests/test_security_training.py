"""Issue 12, the training half: an API key lets you train, nothing more. Every training row of the issue's
table is sent to the real gateway app and refused, and nothing happens: no remote code runs, no file outside
the job's own directory is read or written, no setting of the operator is overridden. Real Redis, the real
model, real trainers (in threads, in `python -m trainer.sft` processes, and a `grape trainer` SIGKILLed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from grape import heartbeats
from grape.chat_templates import BUILTIN, UnknownTemplate, load_template
from grape.jobs import OPTIMIZERS, SCHEDULERS, Hyperparameters, JobSpec, LoraSpec
from grape.settings import Settings
from service.app import create_app
from tests.conftest import MODEL
from tests.test_training import HP, LORA, _claim_as, scored_dataset, wait_job
from trainer.loop import JobError, TrainerLoop

FAKE_DS = "ds-0123456789ab"  # an id of the right form: validation runs before the dataset is looked up
EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def trainers(rclient, keys, settings, tmp_path) -> Iterator[Any]:
    """Trainer loops in threads of this process; GRAPE_TRAIN_DIR is tmp_path/train."""
    running: list[tuple[TrainerLoop, threading.Thread]] = []
    train_settings = settings.model_copy(update={"train_dir": tmp_path / "train", "trainer_heartbeat_s": 5.0})

    def start(**kw: Any) -> TrainerLoop:
        loop = TrainerLoop(rclient, keys, train_settings, block_s=0.2, **kw)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        running.append((loop, thread))
        return loop

    yield start
    for loop, _ in running:
        loop.stop()
    for _, thread in running:
        thread.join(timeout=300)


@contextmanager
def gateway(settings: Settings, **update: Any) -> Iterator[TestClient]:
    """The real gateway app with some operator settings changed."""
    with TestClient(create_app(settings.model_copy(update=update))) as client:
        yield client


def remote_code_model(model_path: str, root: Path) -> tuple[Path, Path]:
    """A copy of the real model whose config and tokenizer point, through auto_map, at a .py file that writes a
    marker file when it is imported. Returns (model dir, marker path)."""
    d, marker = root / "remote-code-model", root / "REMOTE_CODE_RAN"
    shutil.copytree(model_path, d)
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["EvilForCausalLM"]
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    return d, marker


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def refused(r: Any, field: str) -> None:
    assert r.status_code == 422, r.text
    assert field in r.text, (field, r.text[:2000])


# ---- the request is an allow-list --------------------------------------------------------------------------


def test_every_operator_setting_in_a_request_is_a_422_naming_it(api, keys, rclient) -> None:
    other = "job-0123456789ab"
    rows: list[tuple[dict[str, Any], str]] = [
        ({"hyperparameters": {"trust_remote_code": True}}, "trust_remote_code"),
        ({"hyperparameters": {"model_init_kwargs": {"trust_remote_code": True}}}, "model_init_kwargs"),
        (
            {"hyperparameters": {"chat_template_path": "/proc/self/environ", "assistant_only_loss": False}},
            "chat_template",
        ),
        ({"hyperparameters": {"chat_template": "/proc/self/environ"}}, "chat_template"),
        ({"hyperparameters": {"chat_template": "../../etc/passwd"}}, "chat_template"),
        ({"output_dir": "."}, "output_dir"),
        ({"output_dir": other}, "output_dir"),
        ({"output_dir": f"{other}/checkpoint-1"}, "output_dir"),
        ({"hyperparameters": {"output_dir": other}}, "output_dir"),
        ({"hyperparameters": {"report_to": "all"}}, "report_to"),
        ({"hyperparameters": {"save_strategy": "no"}}, "save_strategy"),
        ({"hyperparameters": {"use_cpu": True}}, "use_cpu"),
        ({"hyperparameters": {"deepspeed": "/some/file"}}, "deepspeed"),
        ({"hyperparameters": {"fsdp": "full_shard"}}, "fsdp"),
        ({"hyperparameters": {"dataloader_num_workers": 100000}}, "dataloader_num_workers"),
        ({"hyperparameters": {"max_steps": 4611686018427387904}}, "max_steps"),
        ({"hyperparameters": {"push_to_hub": True, "hub_token": "x"}}, "push_to_hub"),
        ({"hyperparameters": {"logging_dir": "/tmp"}}, "logging_dir"),
        ({"hyperparameters": {"resume_from_checkpoint": f"../{other}/checkpoint-1"}}, "resume_from_checkpoint"),
        ({"hyperparameters": {"per_device_train_batch_size": 10**6}}, "per_device_train_batch_size"),
        ({"hyperparameters": {"max_length": 10**7}}, "max_length"),
        ({"hyperparameters": {"lr_scheduler_type": "reduce_lr_on_plateau"}}, "lr_scheduler_type"),
        ({"hyperparameters": {"optim": "galore_adamw"}}, "optim"),
        ({"hyperparameters": {"seed": 2**40}}, "seed"),
        ({"hyperparameters": {"bf16": True, "fp16": True}}, "fp16"),
        ({"lora": {"r": 8, "target_modules": ["q_proj", "../x"]}}, "target_modules"),
        ({"lora": {"r": 8, "target_modules": [f"m{i}" for i in range(65)]}}, "target_modules"),
        ({"lora": {"r": 8, "alpha": 10**9}}, "alpha"),
        ({"lora": {"r": 8, "bias": "all"}}, "bias"),
        ({"junk": "x"}, "junk"),
    ]
    for extra, field in rows:
        refused(api.post("/v1/training-jobs", json={"dataset_id": FAKE_DS, **extra}), field)
    assert api.get("/v1/training-jobs").json() == {"jobs": [], "unreadable": []}
    assert rclient.llen(keys.job_queue()) == 0

    # the 422 names where the setting comes from instead
    r = api.post("/v1/training-jobs", json={"dataset_id": FAKE_DS, "hyperparameters": {"report_to": "wandb"}})
    assert "GRAPE_TRAIN_REPORT_TO" in r.text


def test_non_finite_numbers_are_422_and_the_job_list_stays_200(api) -> None:
    for body in (
        b'{"dataset_id": "%s", "hyperparameters": {"num_train_epochs": Infinity}}' % FAKE_DS.encode(),
        b'{"dataset_id": "%s", "hyperparameters": {"learning_rate": NaN}}' % FAKE_DS.encode(),
        b'{"dataset_id": "%s", "hyperparameters": {"warmup_steps": -Infinity}}' % FAKE_DS.encode(),
        b'{"dataset_id": "%s", "tau": NaN}' % FAKE_DS.encode(),
        b'{"dataset_id": "%s", "lora": {"dropout": NaN}}' % FAKE_DS.encode(),
        b'{"dataset_id": "%s", "hyperparameters": {"max_grad_norm": 1e999}}' % FAKE_DS.encode(),
    ):
        r = api.post("/v1/training-jobs", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.status_code, r.text)
    r = api.get("/v1/training-jobs")
    assert r.status_code == 200 and r.json()["jobs"] == []


def test_a_huge_body_with_a_junk_field_is_refused_and_nothing_is_stored(api, rclient, keys) -> None:
    body = b'{"dataset_id": "%s", "junk": "%s"}' % (FAKE_DS.encode(), b"x" * (8 * 2**20))
    r = api.post("/v1/training-jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (413, 422), r.status_code
    assert len(r.content) < 64 * 1024, len(r.content)  # the junk is not echoed back
    assert rclient.zcard(keys.jobs()) == 0 and api.get("/v1/training-jobs").json()["jobs"] == []


def test_the_allow_list_is_typed_bounded_and_real_sftconfig_fields() -> None:
    import dataclasses

    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    from trl import SFTConfig

    sft = {f.name for f in dataclasses.fields(SFTConfig)}
    ours = set(Hyperparameters.model_fields) - {"dtype", "chat_template"}  # model load dtype; a template name
    assert ours <= sft, ours - sft
    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}
    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}
    numbers = 0
    for model in (Hyperparameters, LoraSpec):
        for name, field in model.model_fields.items():
            types = set(typing.get_args(field.annotation)) or {field.annotation}
            if types & {int, float}:  # every number has a finite range
                numbers += 1
                assert {type(m).__name__ for m in field.metadata} & {"Le", "Lt"}, f"{name} has no upper bound"
    assert numbers >= 20


def test_the_sft_config_takes_the_operators_settings_never_the_requests(tmp_path) -> None:
    from trainer.sft import checked_max_length, sft_config_kwargs

    spec = JobSpec(dataset_id=FAKE_DS, base_model=MODEL, hyperparameters=Hyperparameters(optim="sgd"))
    kw = sft_config_kwargs(spec, tmp_path / "job-0123456789ab", accelerator=False, settings=Settings())
    assert kw["trust_remote_code"] is False and kw["model_init_kwargs"]["trust_remote_code"] is False
    assert (kw["report_to"], kw["dataloader_num_workers"], kw["save_strategy"]) == ("none", 0, "steps")
    assert kw["push_to_hub"] is False and kw["optim"] == "sgd" and "chat_template_path" not in kw
    operator = Settings(trust_remote_code_models=f"other, {MODEL}", train_report_to="tensorboard")
    kw = sft_config_kwargs(spec, tmp_path / "x", accelerator=False, settings=operator)
    assert kw["trust_remote_code"] is True and kw["model_init_kwargs"]["trust_remote_code"] is True
    assert kw["report_to"] == "tensorboard"

    assert checked_max_length(None, 8192, MODEL) == 8192
    assert checked_max_length(512, 8192, MODEL) == 512
    with pytest.raises(ValueError, match=r"hyperparameters\.max_length 9000 is longer than the context"):
        checked_max_length(9000, 8192, MODEL)


def test_chat_templates_are_names_never_paths(tmp_path) -> None:
    own = tmp_path / "templates"
    own.mkdir()
    (own / "mine.jinja").write_text("{{ messages }}")
    (tmp_path / "outside.jinja").write_text("SECRET")
    assert load_template("mine", own) == "{{ messages }}"
    assert load_template("chatml", None) == BUILTIN["chatml"]
    assert "{% generation %}" in load_template("qwen3", None)  # one of TRL's shipped training templates
    for name in ("../outside", "/proc/self/environ", "mine.jinja/..", ".hidden", "a/b", ""):
        with pytest.raises(UnknownTemplate, match="not a path"):
            load_template(name, own)
    with pytest.raises(UnknownTemplate, match=r"'nope': no such template .*known: chatml, .*mine"):
        load_template("nope", own)
    (own / "huge.jinja").write_bytes(b"x" * (300 * 1024))
    with pytest.raises(UnknownTemplate, match="larger than"):
        load_template("huge", own)


# ---- models are the operator's ---------------------------------------------------------------------------


def test_models_are_the_ones_the_operator_allows(api, settings, rclient, keys, tmp_path) -> None:
    r = api.post("/v1/datasets", json={"name": "x", "target_model": str(tmp_path)})
    refused(r, "target_model")
    assert "GRAPE_ALLOWED_MODELS" in r.json()["detail"] and MODEL in r.json()["allowed_models"]
    assert api.post("/v1/datasets", json={"name": "x", "target_model": MODEL}).status_code == 201
    # a model a live worker serves is allowed by default
    heartbeats.publish(rclient, keys, "w-other", {"name": "w-other", "model": "org/served"})
    assert api.post("/v1/datasets", json={"name": "x", "target_model": "org/served"}).status_code == 201
    with gateway(settings, allowed_models="org/a, org/b") as gw:  # an explicit list replaces the default
        refused(gw.post("/v1/datasets", json={"name": "x", "target_model": MODEL}), "target_model")
        assert gw.post("/v1/datasets", json={"name": "x", "target_model": "org/b"}).status_code == 201
    with gateway(settings, allowed_models="*") as gw:
        assert gw.post("/v1/datasets", json={"name": "x", "target_model": "any/thing"}).status_code == 201


def test_remote_code_never_runs_and_no_file_outside_the_job_is_read_or_written(
    api, settings, worker_factory, trainers, model_path, tmp_path, monkeypatch
) -> None:
    """The issue's first rows, then a real training run of an allowed local model whose config points to
    remote code: trained with the native class, the .py never imported, no secret in any file."""
    evil, marker = remote_code_model(model_path, tmp_path)
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("GRAPE_TEST_SECRET_TOKEN", secret)  # in the training processes' /proc/self/environ
    ds = scored_dataset(api, worker_factory, n=2, candidates=2, start=60)
    hp = {**HP, "max_steps": 2, "per_device_train_batch_size": 2, "max_length": 128, "save_steps": 1}
    base = {"dataset_id": ds, "base_model": str(evil), "lora": {**LORA, "r": 4}}

    # not an allowed model, with or without asking for its code
    refused(api.post("/v1/training-jobs", json=base), "GRAPE_ALLOWED_MODELS")
    for extra in ({"trust_remote_code": True}, {"model_init_kwargs": {"trust_remote_code": True}}):
        refused(api.post("/v1/training-jobs", json={**base, "hyperparameters": {**hp, **extra}}), next(iter(extra)))

    # another job's files, as if it had trained: its directory must stay byte-for-byte the same
    train_dir = tmp_path / "train"
    other = train_dir / "job-aaaaaaaaaaaa"
    (other / "checkpoint-1").mkdir(parents=True)
    (other / "checkpoint-1" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (other / "selection.jsonl").write_bytes(b'{"messages": []}\n')
    before = tree_digest(other)

    with gateway(settings, allowed_models=f"{MODEL},{evil}") as gw:  # the operator allows the directory
        for extra, field in (
            ({"output_dir": "."}, "output_dir"),
            ({"output_dir": other.name}, "output_dir"),
            ({"output_dir": f"{other.name}/checkpoint-1"}, "output_dir"),
            ({"hyperparameters": {**hp, "chat_template_path": "/proc/self/environ"}}, "chat_template_path"),
        ):
            refused(gw.post("/v1/training-jobs", json={**base, **extra}), field)
        unknown = gw.post("/v1/training-jobs", json={**base, "hyperparameters": {**hp, "chat_template": "nope"}})
        assert unknown.status_code == 201, unknown.text  # this gateway has no template dir: the trainer decides
        r = gw.post("/v1/training-jobs", json={**base, "hyperparameters": {**hp, "chat_template": "chatml"}})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        with gateway(settings, chat_template_dir=tmp_path / "templates") as strict:
            (tmp_path / "templates").mkdir()
            refused(
                strict.post("/v1/training-jobs", json={"dataset_id": ds, "hyperparameters": {"chat_template": "nope"}}),
                "nope",
            )

    trainers(launcher="process")  # each job in its own python -m trainer.sft, as grape trainer runs it
    failed = wait_job(api, unknown.json()["id"], ("succeeded", "failed", "cancelled"))
    assert failed["state"] == "failed" and "hyperparameters.chat_template 'nope': no such template" in failed["error"]
    assert "known: " in failed["error"] and "chatml" in failed["error"]
    st = wait_job(api, job_id, ("succeeded", "failed", "cancelled"))
    assert st["state"] == "succeeded", st.get("error")
    out = Path(st["output_dir"])
    assert out == train_dir.resolve() / job_id and st["model_path"] == str(out)
    assert [Path(c).parent for c in st["checkpoints"]] == [out, out]

    assert not marker.exists(), "the model's own Python code ran"
    assert tree_digest(other) == before
    assert sorted(p.name for p in train_dir.iterdir()) == sorted([other.name, job_id, failed["id"]])
    for p in train_dir.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p

    # control: the same directory with its code trusted does run it (so the assertion above can fail)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    code = f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(evil)!r}, trust_remote_code=True)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    assert marker.exists()


# ---- a job owns its directory; jobs can be deleted ---------------------------------------------------------


def test_a_job_writes_only_under_its_own_directory(rclient, keys, settings, tmp_path) -> None:
    loop = TrainerLoop(rclient, keys, settings.model_copy(update={"train_dir": tmp_path / "train"}), name="t")
    assert loop.output_dir("job-0123456789ab") == (tmp_path / "train").resolve() / "job-0123456789ab"
    for bad in ("..", ".", "job-0123456789ab/checkpoint-1", "../job-0123456789ab", "job-XYZ"):
        with pytest.raises(JobError):
            loop.output_dir(bad)
    # a stored spec of an earlier version: its output_dir and pass-through settings are dropped, never used
    old = {"dataset_id": FAKE_DS, "base_model": MODEL, "output_dir": ".", "hyperparameters": {"report_to": "all"}}
    spec = JobSpec.model_validate_json(json.dumps(old))
    assert "output_dir" not in spec.model_dump() and "report_to" not in spec.hyperparameters.model_dump()


def test_jobs_can_be_deleted_but_not_while_running(api, worker_factory, rclient, keys, settings, tmp_path) -> None:
    ds = scored_dataset(api, worker_factory, n=1, candidates=2, start=70)
    queued = api.post("/v1/training-jobs", json={"dataset_id": ds}).json()["id"]
    running = api.post("/v1/training-jobs", json={"dataset_id": ds}).json()["id"]
    assert api.delete(f"/v1/training-jobs/{queued}").status_code == 204
    for path in ("", "/logs"):
        assert api.get(f"/v1/training-jobs/{queued}{path}").status_code == 404
    assert api.delete(f"/v1/training-jobs/{queued}").status_code == 404
    assert not rclient.exists(keys.job(queued), keys.job_log(queued))
    assert rclient.lrange(keys.job_queue(), 0, -1) == [running.encode()]

    assert _claim_as(rclient, keys, "live-1") == running
    rclient.set(keys.trainer("live-1"), b"{}", ex=30)
    r = api.delete(f"/v1/training-jobs/{running}")
    assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
    rclient.delete(keys.trainer("live-1"))  # its trainer died: reaped (failed), then deletable
    assert api.delete(f"/v1/training-jobs/{running}").status_code == 204
    assert api.get("/v1/training-jobs").json()["jobs"] == []
    for bad in ("job-nope", "ds-0123456789ab", "job-0123456789ab:log"):
        assert api.delete(f"/v1/training-jobs/{bad}").status_code == 404

    # trainers remove the deleted jobs' directories from their disks, and only those
    train = tmp_path / "train"
    loop = TrainerLoop(rclient, keys, settings.model_copy(update={"train_dir": train}), name="t")
    for job_id in (queued, running, "job-bbbbbbbbbbbb"):
        (train / job_id / "checkpoint-1").mkdir(parents=True)
    assert sorted(loop.remove_deleted()) == sorted([queued, running])
    assert sorted(p.name for p in train.iterdir()) == ["job-bbbbbbbbbbbb"]


def test_a_bad_record_in_redis_never_makes_the_job_list_500(api, rclient, keys) -> None:
    good = {"dataset_id": FAKE_DS, "base_model": MODEL}
    bad_spec = {**good, "hyperparameters": {"num_train_epochs": None}}  # Infinity as an old version stored it
    for job_id, spec in (("job-00000000000a", bad_spec), ("job-00000000000b", good)):
        rclient.hset(keys.job(job_id), mapping={"id": job_id, "state": "failed", "spec": json.dumps(spec)})
        rclient.hset(keys.job(job_id), mapping={"dataset_id": FAKE_DS, "base_model": MODEL, "created": "1"})
        rclient.zadd(keys.jobs(), {job_id: 1})
    rclient.hset(keys.job("job-00000000000b"), mapping={"loss": "nan", "grad_norm": "inf"})  # a diverged run
    r = api.get("/v1/training-jobs")
    assert r.status_code == 200, r.text
    assert [j["id"] for j in r.json()["jobs"]] == ["job-00000000000b"] and r.json()["unreadable"] == [
        "job-00000000000a"
    ]
    assert r.json()["jobs"][0]["loss"] is None and r.json()["jobs"][0]["grad_norm"] is None
    r = api.get("/v1/training-jobs/job-00000000000a")
    assert r.status_code == 409 and "DELETE" in r.json()["detail"]
    assert api.delete("/v1/training-jobs/job-00000000000a").status_code == 204
    assert api.get("/v1/training-jobs").json()["unreadable"] == []


# ---- a dead trainer's job, with default settings ---------------------------------------------------------


def test_a_sigkilled_trainers_job_is_resumed_within_a_minute_with_defaults(
    api, worker_factory, rclient, keys, redis_url, tmp_path
) -> None:
    """`grape trainer` killed mid-job; a second trainer with default settings (GRAPE_TRAINER_HEARTBEAT_S unset)
    requeues the job (auto_resume) within 60 s without anyone reading it, and resumes it from its checkpoint."""
    defaults = Settings(redis_url=redis_url, key_prefix=keys.prefix, train_dir=tmp_path / "train")
    assert defaults.trainer_heartbeat_s == 30  # expiry 30 s + a live trainer's reaping pass every 10 s: <= 40 s
    ds = scored_dataset(api, worker_factory, n=2, candidates=2, start=80)
    hp = {**HP, "max_steps": 6, "per_device_train_batch_size": 1, "max_length": 64, "save_steps": 1}
    body = {"dataset_id": ds, "hyperparameters": hp, "lora": {**LORA, "r": 4}, "auto_resume": True}
    job_id = api.post("/v1/training-jobs", json=body).json()["id"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPE_TRAINER_HEARTBEAT")}
    env.update({"REDIS_URL": redis_url, "GRAPE_KEY_PREFIX": keys.prefix, "GRAPE_TRAIN_DIR": str(tmp_path / "train")})
    cmd = [sys.executable, "-m", "grape.cli", "trainer", "--launcher", "inline", "--name", "doomed", "--max-jobs", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not rclient.hget(keys.job(job_id), "checkpoints") or b"checkpoint-" not in rclient.hget(
            keys.job(job_id), "checkpoints"
        ):
            assert proc.poll() is None and time.monotonic() < deadline, rclient.hgetall(keys.job(job_id))
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert rclient.hget(keys.job(job_id), "state") == b"running" and rclient.exists(keys.trainer("doomed"))

    live = TrainerLoop(rclient, keys, defaults, name="survivor")  # default heartbeat and reaping interval
    thread = threading.Thread(target=live.run, kwargs={"max_jobs": 1}, daemon=True)
    thread.start()
    try:
        while rclient.hget(keys.job(job_id), "trainer") == b"doomed":  # read from Redis: nothing reaps on read
            assert time.monotonic() - killed < 60, "the dead trainer's job was not taken over within a minute"
            time.sleep(0.2)
        taken = time.monotonic() - killed
        st = wait_job(api, job_id, ("succeeded", "failed", "cancelled"))
    finally:
        live.stop()
        thread.join(timeout=300)
    print(f"\nSIGKILLed trainer: its job was requeued {taken:.1f}s later (default settings)")
    assert st["state"] == "succeeded" and st["attempts"] == 2 and st["step"] == 6, st
    msgs = [json.loads(x)["msg"] for x in api.get(f"/v1/training-jobs/{job_id}/logs").text.splitlines()]
    assert any("trainer doomed stopped sending heartbeats" in m for m in msgs)
    assert any("resuming from" in m and "checkpoint-" in m for m in msgs)
