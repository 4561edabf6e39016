"""`grape train DATASET_ID --base-model M`: create a fine-tuning job over HTTP and follow it with a bar."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import orjson


def _value(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def job_body(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/training-jobs body of the command's arguments (unset options keep the API defaults)."""
    hp: dict[str, Any] = {}
    for name, value in (
        ("max_steps", args.max_steps),
        ("num_train_epochs", args.epochs),
        ("learning_rate", args.lr),
        ("per_device_train_batch_size", args.batch_size),
        ("gradient_accumulation_steps", args.grad_accum),
        ("max_length", args.max_length),
        ("save_steps", args.save_steps),
    ):
        if value is not None:
            hp[name] = value
    if args.packing:
        hp["packing"] = True
    for pair in args.hp or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--hp {pair!r}: give KEY=VALUE (an allowed training setting, grape.jobs.Hyperparameters)")
        hp[key] = _value(value)
    body: dict[str, Any] = {
        "dataset_id": args.dataset_id,
        "strategy": args.strategy,
        "k": args.k,
        "reduce": args.reduce,
        "hyperparameters": hp,
        "auto_resume": args.auto_resume,
    }
    if args.n is not None:
        body["n"] = args.n
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
    t.add_argument("--strategy", default="grape", help="selection strategy")
    t.add_argument("--k", type=int, default=1, help="responses kept per instruction")
    t.add_argument("--reduce", default="mean", choices=["mean", "sum"])
    t.add_argument("--n", type=int, default=None, help="budget of pool-wide strategies")
    t.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: epochs decide)")
    t.add_argument("--epochs", type=float, default=None, help="passes over the selected set (default 1)")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-5, LoRA 1e-4)")
    t.add_argument("--batch-size", type=int, default=None, help="per-device batch size (default 8)")
    t.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps")
    t.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default 1024)")
    t.add_argument("--packing", action="store_true", help="pack sequences into max-length blocks")
    t.add_argument("--save-steps", type=float, default=None, help="checkpoint every N steps (default 500)")
    t.add_argument("--lora-r", type=int, default=None, help="train a LoRA adapter of this rank (default: full)")
    t.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default 2 x r)")
    t.add_argument("--lora-dropout", type=float, default=None)
    t.add_argument("--lora-target-modules", default=None, help="comma-separated module names, or all-linear")
    t.add_argument(
        "--hp",
        action="append",
        metavar="KEY=VALUE",
        help="another allowed training setting (repeatable), e.g. optim=sgd, chat_template=chatml; see the README",
    )
    t.add_argument("--auto-resume", action="store_true", help="resume from the last checkpoint if a trainer dies")
    t.add_argument("--detach", action="store_true", help="print the job id and return at once")
    t.add_argument("--interval", type=float, default=1.0, help="seconds between status polls")
    t.add_argument("--url", default=default_url, help="gateway URL (env GRAPE_URL)")
    t.set_defaults(func=cmd_train)
    return t
