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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
