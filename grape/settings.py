"""One typed settings object for every process, read from the environment (prefix GRAPE_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


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
    max_body_bytes: int = Field(64 * 2**20, ge=1024, description="Largest request body accepted.")
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

    # worker
    backend: Literal["auto", "hf", "vllm"] = Field("auto", description="Scoring backend of a worker.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="Model dtype in workers.")
    device: str = Field("auto", description="torch device for the hf backend: auto, cpu, cuda, cuda:1...")
    batch_tokens: int = Field(8192, ge=64, description="Token budget of one forward batch (padded tokens).")
    read_count: int = Field(4, ge=1, description="Queue entries (chunks) a worker takes per read.")
    block_ms: int = Field(2000, ge=10, description="How long a worker waits on an empty queue per read.")
    claim_idle_ms: int = Field(
        600_000, ge=100, description="A chunk pending this long on a silent worker is taken over by another."
    )
    commit_tokens: int = Field(
        65_536, ge=256, description="A worker writes results after about this many pair tokens (progress)."
    )
    max_deliveries: int = Field(5, ge=1, description="Deliveries of a chunk before it goes to the dead letters.")
    max_model_len: int | None = Field(None, description="Longest pair scored; default: the model's context.")
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

    def training_dir(self) -> Path:
        return self.train_dir if self.train_dir is not None else self.cache_dir / "train"

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
