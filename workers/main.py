"""`grape worker`: one scoring worker process (one per GPU)."""

from __future__ import annotations

import argparse
import logging

from grape.keys import Keys
from grape.models import resolve_model
from grape.redis_client import connect
from grape.score_kinds import DEFAULT_EMBEDDING_MODEL, TASKS, ScoreTask
from grape.settings import DEFAULT_REDIS_URL, Settings, get_settings
from workers import metrics as worker_metrics
from workers.backends import BackendConfig, load_backend
from workers.loop import Worker


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grape worker", description="Score queued pairs of one target model.")
    p.add_argument("--model", required=True, help="target model: smollm2-135m, a local path or a hub id")
    p.add_argument(
        "--task",
        default="logprob",
        choices=[t.value for t in ScoreTask],
        help="what to compute (grape.score_kinds): "
        + ", ".join(f"{t.task.value} on the {t.model_field.replace('_', ' ')}" for t in TASKS)
        + f" (e.g. --model {DEFAULT_EMBEDDING_MODEL} for embedding)",
    )
    p.add_argument("--backend", default=settings.backend, choices=Settings.choices("backend"))
    p.add_argument("--dtype", default=settings.dtype, choices=Settings.choices("dtype"))
    p.add_argument("--device", default=settings.device, help="hf backend: auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-tokens", type=int, default=settings.batch_tokens, help="token budget per batch")
    p.add_argument("--read-count", type=int, default=settings.read_count, help="chunks taken per read")
    p.add_argument("--commit-tokens", type=int, default=settings.commit_tokens, help="write results this often")
    p.add_argument("--max-model-len", type=int, default=settings.max_model_len)
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="vllm: GPUs per engine")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="vllm: share of GPU memory")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="vllm: scheduler token budget")
    p.add_argument(
        "--share-prefix",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute each instruction prefix once for all its candidates (hf: shared KV cache; vllm: prefix "
        "cache reads up to the first scored row); --no-share-prefix runs every pair whole",
    )
    p.add_argument("--block-size", type=int, default=None, help="vllm: KV cache block (prefixes are shared in blocks)")
    p.add_argument("--name", default=None, help="consumer name (default host-pid)")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    p.add_argument(
        "--metrics-port", type=int, default=settings.metrics_port, help="serve /metrics and /ready on this port"
    )
    p.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics server")
    return p


def backend_config(args: argparse.Namespace, settings: Settings) -> BackendConfig:
    """The backend's configuration from the command line: engine options only when given."""
    extra = {
        k: v
        for k, v in {
            "tensor_parallel_size": args.tensor_parallel_size,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "block_size": args.block_size,
        }.items()
        if v is not None
    }
    if not args.share_prefix:
        extra["share_prefix"] = False
    return BackendConfig(
        model=resolve_model(args.model, settings.cache_dir),
        dtype=args.dtype,
        device=args.device,
        batch_tokens=args.batch_tokens,
        max_model_len=args.max_model_len,
        cpu_threads=settings.vllm_cpu_threads,
        extra=extra,
    )


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    args = build_parser(settings).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics_server = None
    if args.metrics_port is not None:  # up while the model loads: /healthz answers, /ready says 503
        redis_url = settings.redis_url or DEFAULT_REDIS_URL
        metrics_server = worker_metrics.serve(args.metrics_port, args.metrics_host, redis_url)
    config = backend_config(args, settings)
    if args.task == "embedding":
        from workers.runners.embedding import Embedder

        device = "auto" if args.device == "auto" else args.device
        backend = Embedder(config.model, device=device, dtype=args.dtype)
    else:
        backend = worker_metrics.InstrumentedBackend(load_backend(args.backend, config), args.model)
    client = connect(settings.redis_url or DEFAULT_REDIS_URL)
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
        task=args.task,
    )
    worker.install_signal_handlers()
    worker_metrics.mark_ready(args.model, metrics_server)
    worker.run(idle_exit_s=args.idle_exit)
    return 0
