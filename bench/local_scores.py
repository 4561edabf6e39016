"""What local (LALP) scores cost next to GRAPE's logprob scores, on the real pool and on a long-trace pool.

    python bench/local_scores.py                          # hf backend, 4 real items + examples/reasoning_pool.jsonl
    python bench/local_scores.py --backend vllm --window 2

Per pool and task: pairs, pair tokens (prompt + response, the unit both rates use), forward tokens (every
token the task's forwards ran over: for `local` each step's prompt + window + step), seconds and
pair-tokens/s. Then what a prefix cache saves of local's forward tokens: `ideal` counts, per item, every
context token that an earlier request of the same item already ran (token-level reuse, scored rows never
reused, as vLLM reads the cache only before the first scored row); `vllm` is what the vLLM engine reported
reading from its cache (`cached_tokens`, whole KV blocks only). The hf backend reuses only identical
contexts (its shared-prefix path groups requests by their whole context).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
REAL_POOL = ROOT.parent / "shared" / "data" / "alpaca_eval_pool_dev.jsonl"
LONG_POOL = ROOT / "examples" / "reasoning_pool.jsonl"


def read(path: Path, n: int, candidates: int, max_chars: int) -> list[dict]:
    out = []
    for line in path.read_bytes().splitlines()[:n]:
        row = orjson.loads(line)
        cands = row["candidates"][:candidates]
        out.append({**row, "candidates": [{**c, "response": c["response"][:max_chars]} for c in cands]})
    return out


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def ideal_reuse(prepared: list) -> int:
    """Context tokens an earlier request of the same item already ran (token-level prefix reuse)."""
    saved = 0
    for p in prepared:
        seen: list[list[int]] = []
        for r in getattr(p, "requests", []):
            seq = r.prompt_ids + r.response_ids
            saved += min(len(r.prompt_ids) - 1, max((_lcp(seq, s) for s in seen), default=0))
            seen.append(seq)
    return saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=4, help="real-pool items")
    ap.add_argument("--candidates", type=int, default=4, help="candidates per real-pool item")
    ap.add_argument("--max-chars", type=int, default=1500, help="real-pool responses cut to this many characters")
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--segmentation", default="blank_line", choices=["blank_line", "line"])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from grape.local_steps import LocalParams
    from grape.models import resolve_model
    from workers.backends import BackendConfig, load_backend
    from workers.runners.local import prepare as local_prepare
    from workers.runners.local import runner as local_runner
    from workers.runners.logprob import runner as logprob_runner

    extra = {"kv_cache_memory_bytes": 2 * 1024**3} if args.backend == "vllm" else {}
    backend = load_backend(
        args.backend,
        BackendConfig(model=resolve_model(args.model), dtype="float32", device="cpu", max_model_len=4096, extra=extra),
    )
    params = LocalParams(args.segmentation, args.window)
    pools = {
        f"real ({args.items}x{args.candidates}, <= {args.max_chars} chars)": read(
            REAL_POOL, args.items, args.candidates, args.max_chars
        ),
        "long-trace (examples/reasoning_pool.jsonl)": read(LONG_POOL, 1000, 1000, 10**9),
    }
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"backend {args.backend}, model {args.model}, window {args.window}, segmentation {args.segmentation}")
    print(f"load average before: {load} on {os.cpu_count()} cores")
    head = f"{'pool':<44} {'task':<8} {'pairs':>5} {'steps/c':>7} {'pair tok':>8} {'fwd tok':>8} {'s':>7} "
    head += f"{'pair-tok/s':>10}"
    print(head)
    print("-" * len(head))
    for name, items in pools.items():
        lp_run, loc_run = logprob_runner(backend, args.model), local_runner(backend, args.model)
        lp_run([(items[0], "auto")])  # warm-up (allocator, kernels) outside the timings
        t = time.perf_counter()
        lp = lp_run([(it, "auto") for it in items])
        lp_s = time.perf_counter() - t
        cached = getattr(backend, "cached_tokens", 0)
        t = time.perf_counter()
        loc = loc_run([(it, ("auto", params)) for it in items])
        loc_s = time.perf_counter() - t
        cached = getattr(backend, "cached_tokens", 0) - cached
        bad = [r.error for r in lp + loc if r.error]
        if bad:
            print(f"failed items: {bad[:3]}", file=sys.stderr)
        pairs = sum(len(r.scores) for r in lp if r.scores)
        pair_tok = sum(s["tokens"] + s["prompt_tokens"] for r in lp if r.scores for s in r.scores)
        fwd = sum(s["forward_tokens"] for r in loc if r.scores for s in r.scores)
        steps = sum(s["steps"] for r in loc if r.scores for s in r.scores)
        print(
            f"{name:<44} {'logprob':<8} {pairs:>5} {1:>7} {pair_tok:>8} {pair_tok:>8} {lp_s:>7.1f} "
            f"{pair_tok / lp_s:>10.0f}"
        )
        print(
            f"{'':<44} {'local':<8} {pairs:>5} {steps / pairs:>7.1f} {pair_tok:>8} {fwd:>8} {loc_s:>7.1f} "
            f"{pair_tok / loc_s:>10.0f}"
        )
        ideal = ideal_reuse([local_prepare(backend, it, ("auto", params)) for it in items])
        line = f"{'':<44} prefix cache: ideal {ideal} of {fwd} forward tokens ({ideal / fwd:.0%})"
        if args.backend == "vllm":
            line += f", vllm read {cached} ({cached / fwd:.0%})"
        print(line)
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
