"""`grape worker`: one scoring worker process (one per GPU)."""

from __future__ import annotations

import argparse
import logging

import redis

from grape.keys import Keys
from grape.models import resolve_model
from grape.settings import DEFAULT_REDIS_URL, Settings, get_settings
from workers.backends import BACKENDS, BackendConfig, load_backend
from workers.loop import Worker


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grape worker", description="Score queued pairs of one target model.")
    p.add_argument("--model", required=True, help="target model: smollm2-135m, a local path or a hub id")
    p.add_argument("--backend", default=settings.backend, choices=["auto", *BACKENDS.names()])
    p.add_argument("--dtype", default=settings.dtype, choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default=settings.device, help="hf backend: auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-tokens", type=int, default=settings.batch_tokens, help="token budget per batch")
    p.add_argument("--read-count", type=int, default=settings.read_count, help="chunks taken per read")
    p.add_argument("--commit-tokens", type=int, default=settings.commit_tokens, help="write results this often")
    p.add_argument("--max-model-len", type=int, default=settings.max_model_len)
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="vllm: GPUs per engine")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="vllm: share of GPU memory")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="vllm: scheduler token budget")
    p.add_argument("--name", default=None, help="consumer name (default host-pid)")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    args = build_parser(settings).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = {
        k: v
        for k, v in {
            "tensor_parallel_size": args.tensor_parallel_size,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_num_batched_tokens": args.max_num_batched_tokens,
        }.items()
        if v is not None
    }
    config = BackendConfig(
        model=resolve_model(args.model, settings.cache_dir),
        dtype=args.dtype,
        device=args.device,
        batch_tokens=args.batch_tokens,
        max_model_len=args.max_model_len,
        extra=extra,
    )
    backend = load_backend(args.backend, config)
    client = redis.Redis.from_url(settings.redis_url or DEFAULT_REDIS_URL)
    worker = Worker(
        client,
        Keys(settings.key_prefix),
        args.model,
        backend,
        read_count=args.read_count,
        block_ms=settings.block_ms,
        claim_idle_ms=settings.claim_idle_ms,
        max_deliveries=settings.max_deliveries,
        commit_tokens=args.commit_tokens,
        name=args.name,
    )
    worker.install_signal_handlers()
    worker.run(idle_exit_s=args.idle_exit)
    return 0
