"""The scoring backend interface: a list of requests in, one list of log-probs per request out.

Every backend answers the same question exactly: for each request, log p(y_t | prompt, y_<t) for every
response token y_t, computed by the target model in one pass over `prompt_ids + response_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ScoreRequest:
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class BackendConfig:
    model: str
    """Path or hub id, already resolved (see grape.models.resolve_model)."""
    dtype: str = "float32"
    """float32, bfloat16, float16 or auto."""
    device: str = "auto"
    """hf backend: torch device; auto = cuda when available, else cpu."""
    batch_tokens: int = 8192
    """Token budget of one forward batch, counted as padded tokens."""
    max_model_len: int | None = None
    """Longest pair accepted; default the model's context length."""
    cpu_threads: str = "auto"
    """vllm on CPU: `all` binds the engine's compute threads to every core this process may use and
    reserves none for its frontend, `vllm` keeps vLLM's own binding (one core reserved), `auto` is `all`
    on machines of up to 8 cores (where the reserved core is a large share) and `vllm` above. Either way
    VLLM_CPU_OMP_THREADS_BIND / VLLM_CPU_NUM_OF_RESERVED_CPU set by the user win."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Backend-specific engine options (e.g. vLLM's tensor_parallel_size, gpu_memory_utilization)."""


class ScoringBackend(Protocol):
    name: str
    tokenizer: Any
    max_model_len: int

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Log-probs of each request's response tokens, in request order.

        Raises on an engine failure; callers check lengths against `max_model_len` first.
        """
        ...

    def info(self) -> dict[str, Any]:
        """What a status page should say about this backend (name, dtype, path taken...)."""
        ...
