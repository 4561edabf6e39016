"""Fine-tuning jobs through the HTTP API: score a real pool with SmolLM2, train a LoRA adapter on the
selected set with TRL on CPU (a trainer in a thread, or `python -m trainer.sft` processes), cancel, refuse,
and reap jobs of dead trainers. Real Redis, real model, real pool."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch

from grape.jobs import Hyperparameters, JobSpec, LoraSpec
from grape.store.io import call
from grape.store.jobqueue import TRAINING
from tests.conftest import MODEL, create, load_pool, wait_done
from trainer.context import Outcome, Stop
from trainer.loop import TrainerLoop

# small and quick on 2 CPU cores, yet a learning rate high enough that the loss clearly drops
HP = {
    "max_steps": 3,
    "learning_rate": 3e-3,
    "per_device_train_batch_size": 4,
    "max_length": 256,
    "gradient_checkpointing": False,
    "bf16": False,
    "save_steps": 2,
}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


def scored_dataset(api, worker_factory, n: int = 4, candidates: int = 3, start: int = 0) -> str:
    ds = create(api)
    items = load_pool(n, max_chars=200, candidates=candidates, start=start)
    assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == n
    worker_factory()
    wait_done(api, ds)
    return ds


def wait_job(api, job_id: str, states: tuple[str, ...], timeout: float = 600, seen: list | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = api.get(f"/v1/training-jobs/{job_id}")
        assert r.status_code == 200, r.text
        st = r.json()
        if seen is not None:
            seen.append((st["state"], st["step"]))
        if st["state"] in states:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(st)
        time.sleep(0.2)


def selection(api, ds: str) -> list[dict]:
    r = api.get(f"/v1/datasets/{ds}/selection")
    return [orjson.loads(line) for line in r.text.splitlines() if line]


def assistant_loss(model: Any, tokenizer: Any, template: str, records: list[dict], max_length: int) -> float:
    """Mean loss over the assistant tokens of the records (token-weighted), as SFT computes it."""
    total, count = 0.0, 0
    for rec in records:
        out = tokenizer.apply_chat_template(
            rec["messages"], chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = torch.tensor([out["input_ids"][:max_length]])
        labels = ids.clone()
        labels[0, torch.tensor(out["assistant_masks"][:max_length]) == 0] = -100
        n = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    return total / count


def test_lora_job_end_to_end_through_the_api(api, worker_factory, trainer_factory, model_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.chat_templates import training_chat_template

    ds = scored_dataset(api, worker_factory)
    r = api.post("/v1/training-jobs", json={"dataset_id": ds, "base_model": MODEL, "hyperparameters": HP, "lora": LORA})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert api.get(f"/v1/training-jobs/{job_id}").json()["state"] == "queued"

    t0 = time.monotonic()
    trainer_factory()
    seen: list[tuple[str, int]] = []
    st = wait_job(api, job_id, ("succeeded", "failed", "cancelled"), seen=seen)
    elapsed = time.monotonic() - t0
    assert st["state"] == "succeeded", st.get("error")
    assert any(s == "running" for s, _ in seen)
    assert (st["step"], st["max_steps"], st["train_records"], st["attempts"]) == (3, 3, 4, 1)
    assert st["loss"] > 0 and st["learning_rate"] > 0 and st["tokens_seen"] > 0
    assert st["started"] >= st["created"] and st["finished"] >= st["started"]
    out = Path(st["output_dir"])
    assert st["model_path"] == str(out)
    assert [Path(c).name for c in st["checkpoints"]] == ["checkpoint-2", "checkpoint-3"]
    assert all(Path(c, "adapter_model.safetensors").exists() for c in st["checkpoints"])
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()

    # the job trained on exactly the API's selection, and the saved tokenizer keeps the model's own template
    records = [orjson.loads(line) for line in (out / "selection.jsonl").read_bytes().splitlines()]
    assert records == selection(api, ds)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(model_path).chat_template

    logs = [orjson.loads(x) for x in api.get(f"/v1/training-jobs/{job_id}/logs").text.splitlines()]
    msgs = [rec["msg"] for rec in logs]
    assert msgs[0] == "queued" and msgs[-1].startswith("succeeded after 3 steps")
    assert any(m.startswith("selected set materialized: 4 records") for m in msgs)
    assert sum(1 for rec in logs if "loss" in rec.get("data", {})) == 3
    followed = api.get(f"/v1/training-jobs/{job_id}/logs", params={"follow": True, "after": logs[2]["id"]})
    assert [orjson.loads(x)["id"] for x in followed.text.splitlines()] == [rec["id"] for rec in logs[3:]]

    # the adapter fits the selected set better than the base model does
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    template = training_chat_template(AutoTokenizer.from_pretrained(model_path))
    before = assistant_loss(base, tokenizer, template, records, HP["max_length"])
    tuned = PeftModel.from_pretrained(base, str(out))
    after = assistant_loss(tuned, tokenizer, template, records, HP["max_length"])
    print(
        f"\nLoRA job: 3 steps in {elapsed:.1f}s with loading, {st['steps_per_second']:.3f} steps/s, "
        f"{st['tokens_seen']} tokens; loss on the selected set {before:.3f} -> {after:.3f}"
    )
    assert after < before - 0.2


def test_only_assistant_tokens_carry_labels(tmp_path) -> None:
    from trainer.context import TrainContext
    from trainer.sft import build_trainer

    item = load_pool(1, max_chars=200)[0]
    records = [
        {"messages": [{"role": "user", "content": item["instruction"]}, {"role": "assistant", "content": "Paris."}]},
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": item["candidates"][0]["response"]},
            ]
        },
    ]
    data = tmp_path / "selection.jsonl"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    hp = Hyperparameters(max_steps=1, max_length=512, bf16=False, gradient_checkpointing=False)

    spec = JobSpec(dataset_id="ds", base_model=MODEL, hyperparameters=hp, lora=LoraSpec(r=8))
    trainer, info = build_trainer(TrainContext("job-labels", spec, data, tmp_path / "out"))
    assert info["template"] == "chat"
    tok = trainer.processing_class
    for i, rec in enumerate(records):
        batch = trainer.data_collator([trainer.train_dataset[i]])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        labelled = ids[labels != -100]
        want = "".join(m["content"] + "<|im_end|>" for m in rec["messages"] if m["role"] == "assistant")
        assert tok.decode(labelled) == want  # the assistant turns and their end-of-turn token, nothing else
        assert tok.decode(ids[labels == -100]).count("<|im_start|>") == len(rec["messages"]) + (i == 0)
        assert 0 < len(labelled) < len(ids)

    # a dataset scored with the plain GRAPE template trains on the same rendering, loss on the response
    spec = JobSpec(dataset_id="ds", base_model=MODEL, template="plain", hyperparameters=hp)
    trainer, info = build_trainer(TrainContext("job-plain", spec, data, tmp_path / "plain"))
    assert info["template"] == "plain"
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert trainer.processing_class.decode(ids[labels != -100]) == " Paris.<|im_end|>"
    assert trainer.processing_class.decode(ids[labels == -100]).endswith(f"Question: {item['instruction']}\nAnswer:")


def test_unknown_chat_template_is_refused_not_trained_on_prompt(model_path) -> None:
    from transformers import AutoTokenizer

    from trainer.chat_templates import TemplateError, training_chat_template

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match=r"hyperparameters\.chat_template "):
        training_chat_template(tok)


def test_cancel_stops_within_a_step_with_a_checkpoint(api, worker_factory, trainer_factory) -> None:
    """The job runs in its own training process (launcher `process`), as `grape trainer` runs it."""
    ds = scored_dataset(api, worker_factory, n=2, candidates=2, start=10)
    hp = {**HP, "max_steps": 200, "per_device_train_batch_size": 1, "max_length": 96, "save_steps": 1000}
    job_id = api.post("/v1/training-jobs", json={"dataset_id": ds, "hyperparameters": hp, "lora": LORA}).json()["id"]
    trainer_factory(launcher="process")
    st = wait_job(api, job_id, ("running", "failed", "succeeded", "cancelled"))
    deadline = time.monotonic() + 600
    while st["step"] < 1:
        assert st["state"] == "running", st
        assert time.monotonic() < deadline
        time.sleep(0.1)
        st = api.get(f"/v1/training-jobs/{job_id}").json()
    t_running = time.monotonic()
    r = api.post(f"/v1/training-jobs/{job_id}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    at_cancel = r.json()["step"]
    st = wait_job(api, job_id, ("cancelled", "failed", "succeeded"))
    print(f"\ncancel at step {at_cancel}: cancelled at step {st['step']} after {time.monotonic() - t_running:.1f}s")
    assert st["state"] == "cancelled", st.get("error")
    assert at_cancel <= st["step"] <= at_cancel + 2
    assert st["max_steps"] == 200 and st["model_path"] is None
    out = Path(st["output_dir"])
    assert out == trainer_factory.settings.train_dir.resolve() / job_id  # the job's own directory
    assert [Path(c).name for c in st["checkpoints"]] == [f"checkpoint-{st['step']}"]
    ckpt = Path(st["checkpoints"][0])
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "trainer_state.json").exists()
    assert (out / "train.log").exists()
    msgs = [orjson.loads(x)["msg"] for x in api.get(f"/v1/training-jobs/{job_id}/logs").text.splitlines()]
    assert any(m.startswith("cancel requested") for m in msgs)
    assert msgs[-1] == f"cancelled at step {st['step']}; checkpoint {ckpt}"
    assert api.post(f"/v1/training-jobs/{job_id}/cancel").status_code == 409  # already cancelled


def test_jobs_are_refused_until_the_dataset_is_scored_and_the_selection_has_records(api, worker_factory) -> None:
    assert api.post("/v1/training-jobs", json={"dataset_id": "ds-nope"}).status_code == 404
    assert api.get("/v1/training-jobs/job-nope").status_code == 404
    assert api.post("/v1/training-jobs/job-nope/cancel").status_code == 404

    ds = create(api)
    api.post(f"/v1/datasets/{ds}/items", json={"items": load_pool(1, max_chars=100, candidates=2, start=20)})
    r = api.post("/v1/training-jobs", json={"dataset_id": ds})  # no worker yet: still scoring
    assert r.status_code == 409 and "scoring" in r.json()["detail"], r.text
    assert r.json()["dataset_state"] == "scoring"

    bad = [
        ({"strategy": "nope"}, "strategy"),
        ({"output_dir": "/etc"}, "output_dir"),
        ({"output_dir": "a/../../b"}, "output_dir"),
        ({"hyperparameters": {"learning_rate": -1}}, "learning_rate"),
        ({"hyperparameters": {"output_dir": "x"}}, "output_dir"),
        ({"hyperparameters": {"max_steps": 0}}, "max_steps"),
        ({"hyperparameters": {"report_to": "none"}}, "report_to"),  # allow-listed fields only
        ({"lora": {"r": 0}}, "lora"),
        ({"k": 0}, "k"),
    ]
    for extra, field in bad:
        r = api.post("/v1/training-jobs", json={"dataset_id": ds, **extra})
        assert r.status_code == 422 and field in r.text, (extra, r.text)

    too_long = {"id": "long", "instruction": "Repeat.", "candidates": [{"response": "word " * 9000}]}
    empty = create(api)
    api.post(f"/v1/datasets/{empty}/items", json={"items": [too_long]})
    worker_factory()
    wait_done(api, ds)
    wait_done(api, empty)
    r = api.post("/v1/training-jobs", json={"dataset_id": empty})  # scored, but every item failed
    assert r.status_code == 422 and "empty" in r.json()["detail"], r.text
    r = api.post("/v1/training-jobs", json={"dataset_id": ds, "hyperparameters": {"warmup_steps": 0.1, "optim": "sgd"}})
    assert r.status_code == 201, r.text
    job = api.get(f"/v1/training-jobs/{r.json()['id']}").json()
    assert job["base_model"] == MODEL and job["spec"]["template"] == "auto"  # defaults from the dataset
    assert job["spec"]["hyperparameters"]["optim"] == "sgd"  # an allow-listed optimizer
    assert [j["id"] for j in api.get("/v1/training-jobs").json()["jobs"]] == [job["id"]]


def _claim_as(rclient, keys, trainer: str) -> str:
    """What a trainer does when it takes a job (BLMOVE + start), for a trainer that then dies."""
    job_id = rclient.blmove(keys.training.queue(), keys.training.claimed(trainer), 1, "RIGHT", "LEFT").decode()
    assert call(rclient, TRAINING.start(keys, job_id, trainer))
    return job_id


def test_jobs_of_dead_trainers_fail_or_resume_and_queued_jobs_cancel(api, worker_factory, rclient, keys, settings):
    ds = scored_dataset(api, worker_factory, n=1, candidates=2, start=40)
    first = api.post("/v1/training-jobs", json={"dataset_id": ds}).json()["id"]
    assert _claim_as(rclient, keys, "ghost-1") == first
    # the gateway sees the running job's trainer has no heartbeat: failed with the reason, not running forever
    st = api.get(f"/v1/training-jobs/{first}").json()
    assert st["state"] == "failed" and "trainer ghost-1 stopped sending heartbeats" in st["error"]
    assert rclient.llen(keys.training.claimed("ghost-1")) == 0

    second = api.post("/v1/training-jobs", json={"dataset_id": ds, "auto_resume": True, "max_attempts": 2}).json()["id"]
    assert _claim_as(rclient, keys, "ghost-2") == second
    rclient.set(keys.training.holder("ghost-2"), b"{}", ex=1)
    live = TrainerLoop(rclient, keys, settings, name="live")
    assert live.reap_dead() == {}  # ghost-2 still has a heartbeat
    time.sleep(1.2)
    assert live.reap_dead() == {second: "resumed"}  # asked for auto_resume: queued again, to resume
    st = api.get(f"/v1/training-jobs/{second}").json()
    assert (st["state"], st["attempts"]) == ("queued", 1)
    assert rclient.hget(keys.training.record(second), "resume") == b"1"
    assert rclient.lrange(keys.training.queue(), 0, -1) == [second.encode()]
    assert _claim_as(rclient, keys, "ghost-3") == second  # second attempt of 2 dies too: now it fails
    assert live.reap_dead() == {second: "failed"}
    assert api.get(f"/v1/training-jobs/{second}").json()["state"] == "failed"

    # failed jobs resume on request; a queued job is cancelled at once
    r = api.post(f"/v1/training-jobs/{second}/resume")
    assert r.status_code == 202 and r.json()["state"] == "queued"
    r = api.post(f"/v1/training-jobs/{second}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert rclient.llen(keys.training.queue()) == 0
    assert api.post(f"/v1/training-jobs/{first}/cancel").status_code == 409


def test_grape_train_cli_follows_the_job(live_gateway, worker_factory, trainer_factory) -> None:
    import httpx

    http = httpx.Client(base_url=live_gateway, timeout=30)
    ds = http.post("/v1/datasets", json={"name": "cli", "target_model": MODEL}).json()["id"]
    http.post(f"/v1/datasets/{ds}/items", json={"items": load_pool(2, max_chars=120, candidates=2, start=50)})
    worker_factory()
    while http.get(f"/v1/datasets/{ds}").json()["state"] != "done":
        time.sleep(0.2)
    trainer_factory()
    cmd = [sys.executable, "-m", "grape.cli", "train", ds, "--base-model", MODEL, "--max-steps", "2", "--lr", "1e-3"]
    cmd += ["--batch-size", "2", "--max-length", "128", "--lora-r", "4", "--url", live_gateway]
    cmd += ["--hp", "bf16=false", "--hp", "gradient_checkpointing=false", "--interval", "0.3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert "succeeded after 2 steps" in proc.stderr and "LoRA adapter in" in proc.stderr
    assert "2/2" in proc.stderr  # the progress bar reached the last step
    st = http.get(f"/v1/training-jobs/{job_id}").json()
    assert st["state"] == "succeeded" and st["spec"]["lora"]["r"] == 4 and st["spec"]["lora"]["alpha"] == 8


def test_accelerate_launcher_runs_jobs_with_trl_shipped_configs(rclient, keys, settings, tmp_path) -> None:
    from trainer.context import TrainContext
    from trainer.loop import JobError

    spec = JobSpec(dataset_id="ds", base_model=MODEL)
    ctx = TrainContext("job-1", spec, tmp_path / "selection.jsonl", tmp_path / "out", resume=True)
    loop = TrainerLoop(rclient, keys, settings, name="t8", launcher="accelerate", accelerate_config="zero3")
    loop.num_processes = 8
    cmd = loop.command(ctx)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    cfg = Path(cmd[cmd.index("--config_file") + 1])
    assert (cfg.parent.parent.name, cfg.name) == ("trl", "zero3.yaml") and "zero_stage: 3" in cfg.read_text()
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    job_args = ["--job", "job-1", "--trainer", "t8", "--data", str(ctx.data_path), "--output-dir", str(ctx.output_dir)]
    assert cmd[cmd.index("trainer.sft") - 1 :] == ["-m", "trainer.sft", *job_args, "--resume"]

    own = tmp_path / "cluster.yaml"
    own.write_text("distributed_type: MULTI_GPU\nnum_processes: 8\n")
    loop = TrainerLoop(rclient, keys, settings, launcher="accelerate", accelerate_config=str(own))
    assert loop.command(ctx)[4] == str(own)
    with pytest.raises(JobError, match="zero3"):  # an unknown name is refused at start, listing TRL's configs
        TrainerLoop(rclient, keys, settings, launcher="accelerate", accelerate_config="zero9")
    assert TrainerLoop(rclient, keys, settings, launcher="process").command(ctx)[:3] == [
        sys.executable,
        "-m",
        "trainer.sft",
    ]


def test_outcome_file_round_trips_and_refuses_an_unknown_stop() -> None:
    """What a training process hands the loop (OUTCOME_FILE): the stop as the Stop enum, never a free string."""
    outcome = Outcome(stop=Stop.requeue, steps=4)
    assert orjson.loads(outcome.to_json()) == {"stop": "requeue", "model_path": None, "steps": 4}
    back = Outcome.from_json(outcome.to_json())
    assert back == outcome and back.stop is Stop.requeue
    with pytest.raises(ValueError, match="finished"):
        Outcome.from_json(b'{"stop": "finished", "model_path": null, "steps": 1}')
