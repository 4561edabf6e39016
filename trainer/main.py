"""`grape trainer`: one trainer process. It takes fine-tuning jobs from Redis one at a time and runs them
with TRL, on this machine's devices (one GPU or CPU inline; several GPUs through `accelerate launch`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from grape.keys import Keys
from grape.redis_client import connect
from grape.settings import DEFAULT_REDIS_URL, Settings, get_settings
from trainer.loop import TrainerLoop


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grape trainer", description="Run queued fine-tuning jobs (TRL SFT).")
    p.add_argument(
        "--launcher",
        choices=["inline", "process", "accelerate"],
        default="process",
        help="inline: train in this process; process: one `python -m trainer.sft` per job (default); "
        "accelerate: `accelerate launch` per job (multi-GPU)",
    )
    p.add_argument(
        "--accelerate-config",
        default=None,
        help="with --launcher accelerate: a TRL shipped config by name (zero3, zero2, fsdp2, multi_gpu...) or a "
        "file (default multi_gpu)",
    )
    p.add_argument("--num-processes", type=int, default=None, help="with accelerate: processes (GPUs) per job")
    p.add_argument("--name", default=None, help="trainer name (default host-pid)")
    p.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    p.add_argument(
        "--train-dir", default=None, help=f"checkpoints go here (GRAPE_TRAIN_DIR; {settings.training_dir()})"
    )
    # the operator's training settings: never a request's
    p.add_argument(
        "--chat-template-dir",
        default=None,
        help="training chat templates, NAME.jinja, that jobs choose by name (GRAPE_CHAT_TEMPLATE_DIR)",
    )
    p.add_argument(
        "--report-to",
        default=None,
        help=f"transformers report_to integrations (GRAPE_TRAIN_REPORT_TO; {settings.train_report_to})",
    )
    p.add_argument(
        "--trust-remote-code-models",
        default=None,
        help="comma-separated models whose own Python code may run when loaded (GRAPE_TRUST_REMOTE_CODE_MODELS; "
        "default none)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    args = build_parser(settings).parse_args(argv)
    update: dict[str, object] = {}
    if args.train_dir:
        update["train_dir"] = Path(args.train_dir)
    if args.chat_template_dir:
        update["chat_template_dir"] = Path(args.chat_template_dir)
    if args.report_to:
        update["train_report_to"] = args.report_to
    if args.trust_remote_code_models is not None:
        update["trust_remote_code_models"] = args.trust_remote_code_models
    if update:
        settings = settings.model_copy(update=update)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = TrainerLoop(
        connect(settings.redis_url or DEFAULT_REDIS_URL),
        Keys(settings.key_prefix),
        settings,
        name=args.name,
        launcher=args.launcher,
        accelerate_config=args.accelerate_config,
        num_processes=args.num_processes,
    )
    loop.install_signal_handlers()
    loop.run(max_jobs=args.max_jobs, idle_exit_s=args.idle_exit)
    return 0
