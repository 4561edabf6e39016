"""One job's training run: the materialized selected set into TRL's `SFTTrainer`.

Runs in the trainer process (launcher `inline`) or as its own process, `python -m trainer.sft` or
`accelerate launch ... -m trainer.sft` (launchers `process`, `accelerate`); the loop (trainer.loop) owns
the job's state either way, this module only trains and reports progress through the callback.

The data is conversational (`messages`) with the loss on the assistant turns only (`assistant_only_loss`
and a chat template with `{% generation %}` markers, see trainer.chat_templates). A dataset scored with the
plain GRAPE template (or a base model without a chat template) trains on the same rendering it was scored
with: prompt `Question: ...\\nAnswer:` and completion ` response<eos>`, with the loss on the completion.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from grape import lifeline
from grape.formatting import plain_prompt, resolve_template
from grape.jobs import (  # noqa: F401 - checked_max_length: the trainer's callers find it here too
    JobSpec,
    TrainSetup,
    check_budget,
    checked_max_length,
    trl_arguments,
)
from grape.records import Template
from grape.settings import Settings
from trainer.context import OUTCOME_FILE, Outcome, Stop, TrainContext

log = logging.getLogger(__name__)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


def to_rows(records: list[dict[str, Any]], template: Template) -> list[dict[str, Any]]:
    """Selected records -> TRL dataset rows: `messages` (chat) or `prompt`/`completion` (plain)."""
    if template is Template.chat:
        return [{"messages": r["messages"]} for r in records]
    return [
        {"prompt": plain_prompt(r["messages"][:-1]), "completion": " " + r["messages"][-1]["content"]} for r in records
    ]


def has_accelerator() -> bool:
    import torch

    acc = getattr(torch, "accelerator", None)
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def train_setup(
    spec: JobSpec,
    settings: Settings,
    *,
    accelerator: bool,
    template: Template = Template.chat,
    context: int | None = None,
) -> TrainSetup:
    """What some hyperparameters resolve with (grape.jobs `TrainSetup`): the job, this trainer and its operator's
    settings, and what the trainer learnt from the base model (the data's format; its context, None while
    unknown)."""
    from trl import SFTConfig

    return TrainSetup(
        lora=spec.lora is not None,
        accelerator=accelerator,
        save_total_limit=settings.train_save_total_limit,
        sft_fields=frozenset(f.name for f in dataclasses.fields(SFTConfig)),
        chat=template is Template.chat,
        model=spec.base_model,
        context=context,
    )


def sft_config_kwargs(
    spec: JobSpec,
    output_dir: str | Path,
    *,
    accelerator: bool,
    settings: Settings | None = None,
    template: Template = Template.chat,
    context: int | None = None,
) -> dict[str, Any]:
    """SFTConfig arguments of a job: its allow-listed hyperparameters, each where its field says it goes
    (grape.jobs `ToTrl`), the operator's settings for everything that touches code, files, the network or the
    machine, and the job's own directory. TRL's defaults elsewhere."""
    if settings is None:
        from grape.settings import get_settings

        settings = get_settings()
    setup = train_setup(spec, settings, accelerator=accelerator, template=template, context=context)
    kw = trl_arguments(spec.hyperparameters, setup)
    trust = settings.trusts_remote_code(spec.base_model)
    kw["model_init_kwargs"] = {**kw.get("model_init_kwargs", {}), "trust_remote_code": trust}
    # the job's own settings and the operator's: never from a request
    kw |= {
        "output_dir": str(output_dir),
        "save_strategy": "steps",
        "use_cpu": not accelerator,
        "trust_remote_code": trust,
        "report_to": settings.train_report_to,
        "dataloader_num_workers": settings.train_dataloader_workers,
        "push_to_hub": False,
        "include_num_input_tokens_seen": "non_padding",
        "disable_tqdm": True,
    }
    return kw


def model_context(config: Any) -> int | None:
    """The longest sequence the model takes (`max_position_embeddings`, also of a nested text config)."""
    for cfg in (config, getattr(config, "text_config", None)):
        n = getattr(cfg, "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def build_trainer(ctx: TrainContext, callbacks: list[Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """The SFTTrainer of a job, and facts about it (template used, records, format)."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from grape.chat_templates import load_template
    from grape.models import resolve_model
    from trainer.chat_templates import has_generation_markers, training_chat_template

    spec = ctx.spec
    hp = spec.hyperparameters
    settings = ctx.operator()
    model_path = resolve_model(spec.base_model)
    # a model's own Python code (auto_map) runs only for the models the operator trusts
    trust = settings.trusts_remote_code(spec.base_model)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
    context = model_context(AutoConfig.from_pretrained(model_path, trust_remote_code=trust))
    accelerator = has_accelerator()
    own = trl_arguments(hp, train_setup(spec, settings, accelerator=accelerator), trainer=True)
    if own["chat_template"]:  # by name, from the operator's directory or grape's / TRL's own: never a path
        tokenizer.chat_template = load_template(own["chat_template"], settings.chat_template_dir)
    original_template = tokenizer.chat_template  # what the saved tokenizer keeps
    template = resolve_template(tokenizer, spec.template)
    records = load_records(ctx.data_path)
    if not records:
        raise ValueError(f"the selected set {ctx.data_path} is empty: nothing to train on")
    kw = sft_config_kwargs(
        spec, ctx.output_dir, accelerator=accelerator, settings=settings, template=template, context=context
    )
    if kw["assistant_only_loss"] and not has_generation_markers(tokenizer.chat_template):
        tokenizer.chat_template = training_chat_template(tokenizer)
    args = SFTConfig(**kw)
    # defence in depth: the gateway counted one process and at most the selection's size; here the real
    # record count, world size and max_length decide, against this trainer's own caps (OverBudget fails the job)
    check_budget(
        hp,
        len(records),
        max_tokens=settings.max_train_tokens,
        max_saves=settings.max_train_saves,
        world_size=args.world_size,
        max_length=kw["max_length"],
    )
    peft_config = None
    if spec.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=spec.lora.target_modules,
            task_type="CAUSAL_LM",
        )
    trainer = SFTTrainer(
        model=model_path,
        args=args,
        train_dataset=Dataset.from_list(to_rows(records, template)),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    info = {
        "model_path": model_path,
        "template": template.value,
        "records": len(records),
        "original_chat_template": original_template,
        "lora": spec.lora is not None,
    }
    return trainer, info


def train(ctx: TrainContext, client: Any, keys: Any) -> Outcome:
    """Train the job; progress goes to Redis through the callback. Raises on errors (the loop fails the job)."""
    from transformers.trainer_utils import get_last_checkpoint

    from grape.store.jobqueue import TRAINING
    from trainer.callbacks import JobProgressCallback

    callback = JobProgressCallback(client, keys, ctx.job_id, ctx.trainer_name)
    trainer, info = build_trainer(ctx, callbacks=[callback])
    main = trainer.is_world_process_zero()
    resume_from = None
    if ctx.resume and ctx.output_dir.exists():
        resume_from = get_last_checkpoint(str(ctx.output_dir))
    if main:
        kind = "LoRA adapter" if info["lora"] else "full fine-tuning"
        TRAINING.log(
            client,
            keys,
            ctx.job_id,
            f"model {ctx.spec.base_model} loaded ({kind}); {info['records']} records, {info['template']} "
            "template" + (f"; resuming from {resume_from}" if resume_from else ""),
            model_path=info["model_path"],
        )
    trainer.train(resume_from_checkpoint=resume_from)
    steps = trainer.state.global_step
    if callback.stop is not Stop.none:
        return Outcome(stop=callback.stop, steps=steps)
    # the saved tokenizer keeps the model's own template (the markers matter for training only)
    trainer.processing_class.chat_template = info["original_chat_template"]
    trainer.save_model(str(ctx.output_dir))
    return Outcome(stop=Stop.none, model_path=str(ctx.output_dir), steps=steps)


# ---- as its own process ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.sft", description="Train one job (started by grape trainer).")
    p.add_argument("--job", required=True)
    p.add_argument("--trainer", required=True, help="name of the trainer that holds the job")
    p.add_argument("--data", required=True, help="the materialized selected set (NDJSON)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    # a rank under `accelerate launch` dies with its launcher, itself armed by the trainer (grape.lifeline);
    # run straight by the trainer, this process was armed before its exec and this is a no-op
    lifeline.hold_on()
    lifeline.guard_children()
    from grape.keys import Keys
    from grape.redis_client import connect
    from grape.settings import DEFAULT_REDIS_URL, get_settings
    from grape.store.io import run
    from grape.store.jobqueue import TRAINING

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    client = connect(settings.redis_url or DEFAULT_REDIS_URL)
    keys = Keys(settings.key_prefix)
    raw = run(client, TRAINING.field(keys, args.job, "spec"))
    if raw is None:
        print(f"training job {args.job} not found", file=sys.stderr)
        return 2
    ctx = TrainContext(
        job_id=args.job,
        spec=JobSpec.model_validate_json(raw),
        data_path=Path(args.data),
        output_dir=Path(args.output_dir),
        resume=args.resume,
        trainer_name=args.trainer,
        settings=settings,
    )
    outcome = train(ctx, client, keys)
    if int(os.environ.get("RANK", "0")) == 0:
        (ctx.output_dir / OUTCOME_FILE).write_bytes(outcome.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
