"""The service end to end against what a user would run instead: the same pairs, the same dtype, one
after the other on the same machine.

    python bench/peers.py --pool real                       # 8 real items x 8 candidates, fp32
    python bench/peers.py --pool long-prefix                # 4 multi-turn items x 10 candidates
    python bench/peers.py --pool real --dtype bfloat16
    python bench/peers.py --pool real --items 2 --peers lm-eval-16,plain,service   # a quick run

Peers (each in a process of its own, run one after the other; model load and engine start are never timed,
and no peer gets a warm-up call):

- lm-eval-16, lm-eval-auto: lm-evaluation-harness's HF backend (`lm_eval.models.huggingface.HFLM`), its
  `loglikelihood` on `Instance("loglikelihood", (context, continuation))` with batch size 16 and `auto`.
  context = the prompt exactly as the service renders it (chat template with the generation prompt),
  continuation = the response. `auto` detects its batch size inside the timed call (five forwards per
  size tried, from 64 down), as it does for a user; the seconds it spent detecting are printed. The child
  runs under a data-size limit (--lm-eval-memory-gib) so that a batch too big for this shared machine
  fails with the allocator error lm-eval catches and halves on, not with the kernel's OOM killer.
- vllm-hand: vLLM as a user scripts it: every pair pre-tokenized into a `TokensPrompt`, one
  `LLM.generate` call with `SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)`, the
  engine's defaults (thread binding included: printed) apart from `kv_cache_memory_bytes` (2 GiB, as the
  service's worker sets it on CPU; without it vLLM claims 92% of the host's RAM).
- plain: a plain batched transformers forward: pairs longest first, 16 sequences per padded batch,
  full-vocabulary log-softmax (in fp32), gather; --threads torch threads.
- service, service-hf, service-vllm: the service end to end: a gateway process, Redis, one worker process
  (`python -m workers`) with its default backend, `--backend hf`, `--backend vllm`. The worker is started
  first and the clock starts once its heartbeat shows it ready (model load / engine start excluded, as for
  every peer); timed from the start of the upload (one NDJSON request) to dataset state `done`.

Pair-tokens = prompt + response tokens of every candidate, as the service tokenizes them; pair-tok/s =
pair-tokens / seconds for every row alike. `service/peer` = the service's (default backend) pair-tok/s over
the peer's. max |Δsum| = the largest difference of a candidate's summed log-prob from lm-eval's (batch 16)
in the same dtype. lm-eval tokenizes context + continuation jointly and moves the context's trailing
whitespace (here the "\\n" after "assistant") into the continuation, so its sum holds one more token than
the service's: the log-prob of that "\\n" (the token sequences are otherwise identical). With
--lm-eval-split, lm-eval (batch 16) also runs its own `_loglikelihood_tokens` on the service's split, and
the note under the table says how much the boundary alone moves its sums.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import peerlib

PEERS = {
    "lm-eval-16": "lm-eval HF loglikelihood, batch 16",
    "lm-eval-auto": "lm-eval HF loglikelihood, batch auto",
    "vllm-hand": "vLLM by hand (one generate, prompt_logprobs=0)",
    "plain": "plain batched forward (16/batch, log-softmax)",
    "service": "service end to end, default backend",
    "service-hf": "service end to end, --backend hf",
    "service-vllm": "service end to end, --backend vllm",
}
SERVICE_ARGS = {"service": [], "service-hf": ["--backend", "hf"], "service-vllm": ["--backend", "vllm"]}
REFERENCE = "lm-eval-16"
TARGETS = {  # (pool, peer) -> the ratio the issue asks of the service's default backend
    ("real", "lm-eval-16"): 1.2,
    ("real", "lm-eval-auto"): 1.2,
    ("real", "plain"): 1.2,
    ("real", "vllm-hand"): 1.2,
    ("long-prefix", "vllm-hand"): 3.0,
}


# --- the peers, each run in a child process ------------------------------------------------------------
def run_lm_eval(work: dict[str, Any], batch_size: str) -> dict[str, Any]:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(work["threads"])
    bs: int | str = int(batch_size) if batch_size.isdigit() else batch_size
    lm = HFLM(pretrained=work["model"], dtype=work["dtype"], device="cpu", batch_size=bs)
    detect = {"seconds": 0.0, "sizes": []}
    original = lm._detect_batch_size

    def timed_detect(*a: Any, **kw: Any) -> int:  # measures only; lm-eval's own detection runs unchanged
        t = time.perf_counter()
        size = original(*a, **kw)
        detect["seconds"] += time.perf_counter() - t
        detect["sizes"].append(size)
        return size

    lm._detect_batch_size = timed_detect
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=i)
        for i, (ctx, cont) in enumerate(work["pairs_text"])
    ]
    t = time.perf_counter()
    got = lm.loglikelihood(instances, disable_tqdm=True)
    seconds = time.perf_counter() - t
    out = {"seconds": seconds, "sums": [lp for lp, _ in got], "detect": detect}
    if batch_size == "16" and work["lm_eval_split"]:
        # the same model on the service's split (context = prompt ids, continuation = response ids): how much
        # of the difference is lm-eval's token boundary
        reqs = [((c, r), p, q) for (c, r), (p, q) in zip(work["pairs_text"], work["pairs_ids"], strict=True)]
        out["split_sums"] = [lp for lp, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]
    return out


def run_vllm_hand(work: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=work["model"], dtype=work["dtype"], seed=0, kv_cache_memory_bytes=2 * 1024**3)
    prompts = [TokensPrompt(prompt_token_ids=p + r) for p, r in work["pairs_ids"]]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    t = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    sums = []
    for o, (p, r) in zip(outputs, work["pairs_ids"], strict=True):
        sums.append(sum(o.prompt_logprobs[len(p) + j][tok].logprob for j, tok in enumerate(r)))
    llm.llm_engine.engine_core.shutdown()
    return {"seconds": seconds, "sums": sums}


def run_plain(work: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(work["threads"])
    dtype = getattr(torch, work["dtype"])
    model = AutoModelForCausalLM.from_pretrained(work["model"], dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(work["model"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    pairs = work["pairs_ids"]
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    sums = [0.0] * len(pairs)
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), 16):
            batch = order[s : s + 16]
            width = max(len(pairs[i][0]) + len(pairs[i][1]) for i in batch)
            ids = torch.full((len(batch), width), pad)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                seq = pairs[i][0] + pairs[i][1]
                ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for b, i in enumerate(batch):
                p, r = len(pairs[i][0]), pairs[i][1]
                sums[i] = logp[b, p - 1 : p - 1 + len(r)].gather(1, torch.tensor(r)[:, None]).sum().item()
    return {"seconds": time.perf_counter() - t, "sums": sums}


def child(name: str, workdir: Path) -> None:
    work = json.loads((workdir / "work.json").read_text())
    if name.startswith("lm-eval"):
        limit = int(work["lm_eval_memory_gib"] * 1024**3)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        result = run_lm_eval(work, name.removeprefix("lm-eval-"))
    elif name == "vllm-hand":
        result = run_vllm_hand(work)
    elif name == "plain":
        result = run_plain(work)
    else:
        raise SystemExit(f"unknown child peer {name!r}")
    (workdir / f"{name}.json").write_text(json.dumps(result))


# --- the parent: build the pairs, run every peer, print the table ---------------------------------------
def run_child(name: str, workdir: Path) -> dict[str, Any]:
    log = workdir / f"{name}.log"
    with open(log, "wb") as f:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--workdir", str(workdir)], stdout=f, stderr=f, check=False
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{name} exited with {proc.returncode}:\n" + "\n".join(tail))
    result = json.loads((workdir / f"{name}.json").read_text())
    result["binding"] = vllm_binding(log)
    return result


def vllm_binding(log: Path) -> str:
    """The cores vLLM's CPU worker bound its compute threads to and the ones it reserved, from its log."""
    text = log.read_text(errors="replace") if log.exists() else ""
    found = []
    for line in text.splitlines():
        for key in ("VLLM_CPU_OMP_THREADS_BIND=", "core ids=", "reserved_cpus="):
            if key in line:
                found.append(line[line.index(key) :].split(", auto_setup")[0].strip())
    return "; ".join(dict.fromkeys(found))


def run_service(name: str, items: list[dict], workdir: Path, dtype: str, redis_url: str) -> dict[str, Any]:
    from live_service import LiveService

    with LiveService(redis_url, SERVICE_ARGS[name], workdir, name, dtype) as svc:
        beat = svc.wait_worker_ready()
        seconds, sums, _ = svc.score(items)
    path = beat.get("path", "") + (" + prefix cache" if beat.get("prefix_reuse") else "")
    return {
        "seconds": seconds,
        "sums": sums,
        "backend": f"{beat.get('backend')}: {path}",
        "binding": vllm_binding(svc.log_path),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", choices=peerlib.POOLS, default="real")
    ap.add_argument("--items", type=int, default=None, help="items of the pool (default: real 8, long-prefix 4)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of: {', '.join(PEERS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the lm-eval and plain peers")
    ap.add_argument("--lm-eval-memory-gib", type=float, default=10.0, help="data-size limit of the lm-eval child")
    ap.add_argument(
        "--lm-eval-split",
        action="store_true",
        help="run lm-eval (batch 16) again on the service's token split, to show what its boundary moves",
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="rounds over the peers, interleaved; the table keeps each one's fastest"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="where the pairs, results and logs go")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.workdir)
        return 0

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        ap.error(f"unknown peer(s) {unknown}: choose from {', '.join(PEERS)}")
    from transformers import AutoTokenizer

    from grape.models import resolve_model

    model = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(model)
    items = peerlib.load_pool(args.pool, args.items or peerlib.DEFAULT_ITEMS[args.pool], tok)
    requests, _ = peerlib.pair_requests(tok, items)
    pairs_text = [(peerlib.prompt_text(tok, it), c["response"]) for it in items for c in it["candidates"]]
    pair_tokens = sum(r.length for r in requests)
    workdir = args.workdir or Path(f"/tmp/grape-peers-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    work = {
        "model": model,
        "dtype": args.dtype,
        "threads": args.threads,
        "lm_eval_memory_gib": args.lm_eval_memory_gib,
        "lm_eval_split": args.lm_eval_split,
        "pairs_text": pairs_text,
        "pairs_ids": [(r.prompt_ids, r.response_ids) for r in requests],
    }
    (workdir / "work.json").write_text(json.dumps(work))
    print(
        f"pool {args.pool}: {len(items)} items, {len(requests)} pairs, {pair_tokens} pair-tokens "
        f"(~{pair_tokens / len(requests):.0f}/pair); {args.dtype}; {peerlib.machine_load()}; logs in {workdir}",
        flush=True,
    )

    redis_url, embedded = None, None
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    runs: dict[str, list[float]] = {}
    try:
        for _ in range(args.repeat):
            for name in peers:
                if name in failed:
                    continue
                print(f"  running {name} ({peerlib.machine_load()})", flush=True)
                try:
                    if name.startswith("service"):
                        if redis_url is None:
                            from live_service import find_redis

                            redis_url, embedded = find_redis()
                        got = run_service(name, items, workdir, args.dtype, redis_url)
                    else:
                        got = run_child(name, workdir)
                except Exception as exc:  # noqa: BLE001 - one broken peer must not hide the others' figures
                    failed[name] = f"{type(exc).__name__}: {exc}"
                    print(f"    FAILED: {failed[name]}", flush=True)
                    continue
                print(f"    {got['seconds']:.1f} s", flush=True)
                runs.setdefault(name, []).append(got["seconds"])
                # the machine is shared: the fastest of the rounds is the least disturbed one
                if name not in results or got["seconds"] < results[name]["seconds"]:
                    results[name] = got
    finally:
        if embedded is not None:
            embedded.stop()
    print_table(args, [p for p in peers if p in results], results, pair_tokens, len(requests))
    if args.repeat > 1:
        for name, secs in runs.items():
            print(f"{name}: seconds of each round {', '.join(f'{x:.1f}' for x in secs)} (the table shows the fastest)")
    for name, error in failed.items():
        print(f"{name}: FAILED: {error.splitlines()[0]}")
    return 1 if failed else 0


def print_table(args: argparse.Namespace, peers: list[str], results: dict, pair_tokens: int, pairs: int) -> None:
    if not peers:
        return
    ref_name = REFERENCE if REFERENCE in results else peers[0]
    ref = results[ref_name]["sums"]
    service = results.get("service")
    print()
    print(
        f"pool {args.pool}, {pairs} pairs, {pair_tokens} pair-tokens, {args.dtype}, {peerlib.machine_load()} at the end"
    )
    head = ("peer", "seconds", "pair-tok/s", "service/peer", f"max|Δsum| vs {ref_name}")
    print(f"{head[0]:<50} {head[1]:>8} {head[2]:>10} {head[3]:>12} {head[4]:>22}")
    for name in peers:
        r = results[name]
        tps = pair_tokens / r["seconds"]
        ratio = f"{r['seconds'] / service['seconds']:.2f}x" if service else "-"
        diff = max(abs(a - b) for a, b in zip(r["sums"], ref, strict=True))
        print(f"{PEERS[name]:<50} {r['seconds']:>8.1f} {tps:>10.0f} {ratio:>12} {diff:>22.2e}")
    print()
    for name in peers:
        r = results[name]
        notes = []
        if r.get("backend"):
            notes.append(f"worker backend {r['backend']}")
        if r.get("binding"):
            notes.append(f"vLLM threads: {r['binding']}")
        if r.get("detect", {}).get("sizes"):
            d = r["detect"]
            notes.append(f"batch size detected {d['sizes']} in {d['seconds']:.1f} s of the timed call")
        if "split_sums" in r:
            moved = max(abs(a - b) for a, b in zip(r["sums"], r["split_sums"], strict=True))
            exact = max(abs(a - b) for a, b in zip(r["split_sums"], service["sums"], strict=True)) if service else None
            notes.append(
                f"lm-eval boundary: its joint tokenization moves sums by up to {moved:.2e} vs its own "
                "_loglikelihood_tokens on the service's split"
                + (f", which agrees with the service within {exact:.2e}" if exact is not None else "")
            )
        for note in notes:
            print(f"{name}: {note}")
    if service:
        print()
        for (pool, peer), want in TARGETS.items():
            if pool == args.pool and peer in results and peer != "service":
                got = results[peer]["seconds"] / service["seconds"]
                print(f"target service >= {want}x {peer}: {got:.2f}x {'met' if got >= want else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
