"""`grape train DATASET_ID --base-model M`: create a fine-tuning job over HTTP and follow it with a bar."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from grape.cli_options import add_hp_flags, add_selection_flags, hp_args, selection_args

HP_FLAGS = {
    "--max-steps": "max_steps",
    "--epochs": "num_train_epochs",
    "--lr": "learning_rate",
    "--batch-size": "per_device_train_batch_size",
    "--grad-accum": "gradient_accumulation_steps",
    "--max-length": "max_length",
    "--save-steps": "save_steps",
}
"""Flags of common hyperparameters -> their field (type, bounds and help are the field's)."""


def job_body(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/training-jobs body of the command's arguments (unset options keep the API defaults)."""
    hp: dict[str, Any] = {"packing": True} if args.packing else {}
    hp.update(hp_args(args, HP_FLAGS.values()))  # an --hp given names the value
    body: dict[str, Any] = {
        "dataset_id": args.dataset_id,
        **({"strategy": args.strategy} if args.strategy else {}),
        **selection_args(args),
        "hyperparameters": hp,
        "auto_resume": args.auto_resume,
    }
    if args.base_model:
        body["base_model"] = args.base_model
    if args.lora_r is not None:
        lora: dict[str, Any] = {"r": args.lora_r, "alpha": args.lora_alpha or 2 * args.lora_r}
        if args.lora_dropout is not None:
            lora["dropout"] = args.lora_dropout
        if args.lora_target_modules:
            mods = args.lora_target_modules
            lora["target_modules"] = mods if mods == "all-linear" else [m.strip() for m in mods.split(",")]
        body["lora"] = lora
    return body


def cmd_train(args: argparse.Namespace) -> int:
    from grape.client import GrapeClient
    from grape.progress import watch_training

    with GrapeClient(args.url, api_key=os.environ.get("GRAPE_API_KEY")) as client:
        job = client.create_training_job(job_body(args))
        print(f"training job {job['id']} queued", file=sys.stderr)
        if args.detach:
            print(job["id"])
            return 0
        try:
            st = watch_training(client, job["id"], interval=args.interval)
        except KeyboardInterrupt:
            print(
                f"\nstopped watching; job {job['id']} goes on (cancel: POST {args.url}/v1/training-jobs/{job['id']}"
                "/cancel)",
                file=sys.stderr,
            )
            return 130
    if st["state"] == "succeeded":
        what = "LoRA adapter" if st["spec"].get("lora") else "model"
        loss = f", last loss {st['loss']:.4f}" if st.get("loss") is not None else ""
        print(f"succeeded after {st['step']} steps{loss}; {what} in {st['model_path']}", file=sys.stderr)
    elif st["state"] == "cancelled":
        print(f"cancelled at step {st['step']}; checkpoints: {', '.join(st['checkpoints']) or 'none'}", file=sys.stderr)
    else:
        print(f"failed: {st.get('error')}", file=sys.stderr)
    print(job["id"])
    return 0 if st["state"] == "succeeded" else 1


def add_train_parser(sub: Any, *, default_url: str) -> argparse.ArgumentParser:
    t = sub.add_parser(
        "train",
        help="fine-tune a model on a dataset's selected set (TRL SFT) and follow the job",
        description="Create a fine-tuning job (POST /v1/training-jobs); a `grape trainer` runs it.",
    )
    t.add_argument("dataset_id")
    t.add_argument("--base-model", default=None, help="model to fine-tune (default: the dataset's target model)")
    add_selection_flags(t)
    add_hp_flags(t, HP_FLAGS)
    t.add_argument("--packing", action="store_true", help="pack sequences into max-length blocks")
    t.add_argument("--lora-r", type=int, default=None, help="train a LoRA adapter of this rank (default: full)")
    t.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default 2 x r)")
    t.add_argument("--lora-dropout", type=float, default=None)
    t.add_argument("--lora-target-modules", default=None, help="comma-separated module names, or all-linear")
    t.add_argument("--auto-resume", action="store_true", help="resume from the last checkpoint if a trainer dies")
    t.add_argument("--detach", action="store_true", help="print the job id and return at once")
    t.add_argument("--interval", type=float, default=1.0, help="seconds between status polls")
    t.add_argument("--url", default=default_url, help="gateway URL (env GRAPE_URL)")
    t.set_defaults(func=cmd_train)
    return t
