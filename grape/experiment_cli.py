"""`grape experiment DATASET_ID --arms S1,S2,S3 --pairs 200 --tasks T1,T2 --wait`: create an
experiment over HTTP, follow it with a bar, print the table (base model first, best value per task marked *)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from grape.cli_options import add_hp_flags, hp_args, json_or_text, plain_strategies, strategy_names
from grape.experiments import TERMINAL, format_table

HP_FLAGS = {
    "--max-steps": "max_steps",
    "--lr": "learning_rate",
    "--batch-size": "per_device_train_batch_size",
    "--max-length": "max_length",
}
"""Flags of common hyperparameters -> their field (type, bounds and help are the field's)."""


def experiment_body(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/experiments body of the command's arguments (unset options keep the API defaults)."""
    arms = [{"strategy": a.strip()} for a in args.arms.split(",") if a.strip()]
    hp = hp_args(args, HP_FLAGS.values())
    evaluation: dict[str, Any] = {"tasks": [t.strip() for t in args.tasks.split(",") if t.strip()]}
    for name, value in (("limit", args.limit), ("num_fewshot", args.num_fewshot)):
        if value is not None:
            evaluation[name] = value
    if args.eval_batch_size is not None:
        evaluation["batch_size"] = json_or_text(args.eval_batch_size)
    body: dict[str, Any] = {
        "dataset_id": args.dataset_id,
        "arms": arms,
        "budget": {"pairs": args.pairs},
        "hyperparameters": hp,
        "evaluation": evaluation,
        "include_base": not args.no_base,
        "seed": args.seed,
    }
    if args.base_model:
        body["base_model"] = args.base_model
    if args.lora_r:
        body["lora"] = {"r": args.lora_r, "alpha": 2 * args.lora_r}
    return body


def stages(exp: dict[str, Any]) -> tuple[int, int]:
    """(stages done, stages in all): each arm trains then evaluates; the base model evaluates."""
    total = 2 * len(exp["arms"]) + (1 if exp.get("base") else 0)
    done = 0
    for arm in exp["arms"]:
        if arm["state"] in ("succeeded", "failed", "cancelled"):
            done += 2
        elif arm["state"] == "evaluating":
            done += 1
    if exp.get("base") and exp["base"].get("eval_state") in ("succeeded", "failed", "cancelled"):
        done += 1
    return done, total


def watch_experiment(client: Any, exp_id: str, *, interval: float = 2.0) -> dict[str, Any]:
    """A bar over the experiment's stages (training and evaluating each arm, evaluating the base)."""
    from tqdm import tqdm

    exp = client.experiment(exp_id)
    with tqdm(total=stages(exp)[1], unit="stage", desc=exp["state"], dynamic_ncols=True, file=sys.stderr) as bar:
        while True:
            bar.n = stages(exp)[0]
            training = [a for a in exp["arms"] if a["state"] == "training" and a.get("max_steps")]
            steps = ", ".join(f"{a['label']} {a.get('step') or 0}/{a['max_steps']}" for a in training)
            bar.set_description(exp["state"], refresh=False)
            bar.set_postfix_str(steps, refresh=False)
            bar.refresh()
            if exp["state"] in TERMINAL:
                return exp
            time.sleep(interval)
            exp = client.experiment(exp_id)


def cmd_experiment(args: argparse.Namespace) -> int:
    from grape.client import GrapeClient

    with GrapeClient(args.url, api_key=os.environ.get("GRAPE_API_KEY")) as client:
        created = client.create_experiment(experiment_body(args))
        exp_id = created["id"]
        print(f"experiment {exp_id} queued", file=sys.stderr)
        if not args.wait:
            print(exp_id)
            return 0
        try:
            exp = watch_experiment(client, exp_id, interval=args.interval)
        except KeyboardInterrupt:
            print(f"\nstopped watching; experiment {exp_id} goes on (cancel: POST /v1/experiments/{exp_id}/cancel)")
            return 130
    print(f"experiment {exp_id}: {exp['state']} (dataset {exp['dataset_id']}, {exp['budget']['pairs']} pairs per arm)")
    print(format_table(exp))
    for arm in exp["arms"]:
        if arm.get("error"):
            print(f"arm {arm['label']}: {arm['error']}", file=sys.stderr)
    if exp.get("versions"):
        print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(exp["versions"].items())))
    return 0 if exp["state"] == "succeeded" else 1


def add_experiment_parser(sub: Any, *, default_url: str) -> argparse.ArgumentParser:
    x = sub.add_parser(
        "experiment",
        help="train one model per selection strategy on an equal budget, evaluate each, print the table",
        description="Create an experiment (POST /v1/experiments); `grape trainer` and `grape evaluator` run it.",
    )
    x.add_argument("dataset_id")
    x.add_argument(
        "--arms",
        required=True,
        help=f"strategies, comma-separated, of: {strategy_names()} (e.g. {','.join(plain_strategies())})",
    )
    x.add_argument("--pairs", type=int, required=True, help="pairs every arm trains on")
    x.add_argument("--tasks", required=True, help="lm-eval tasks, comma-separated")
    x.add_argument("--limit", type=int, default=None, help="examples per task (lm-eval limit)")
    x.add_argument("--num-fewshot", type=int, default=None)
    x.add_argument("--eval-batch-size", default=None, help="lm-eval batch size (an integer or auto)")
    x.add_argument("--base-model", default=None, help="model to fine-tune (default: the dataset's target model)")
    x.add_argument("--no-base", action="store_true", help="do not evaluate the base model")
    x.add_argument("--seed", type=int, default=0, help="seed of the instructions drawn for per-instruction arms")
    add_hp_flags(x, HP_FLAGS)
    x.add_argument("--lora-r", type=int, default=16, help="LoRA rank (0: full fine-tuning); alpha is 2 x r")
    x.add_argument("--wait", action="store_true", help="follow it with a progress bar and print the table")
    x.add_argument("--interval", type=float, default=2.0, help="seconds between status polls")
    x.add_argument("--url", default=default_url, help="gateway URL (env GRAPE_URL)")
    x.set_defaults(func=cmd_experiment)
    return x
