"""Scoring backends, registered by name and imported only when asked for."""

from __future__ import annotations

from grape.registry import Registry
from workers.backends.base import BackendConfig, ScoreRequest, ScoringBackend

BACKENDS: Registry[type] = Registry("scoring backend")
BACKENDS.register("hf", "workers.backends.hf:HFBackend")
BACKENDS.register("vllm", "workers.backends.vllm:VLLMBackend")


def default_backend() -> str:
    """vLLM where it is installed and a GPU is present; transformers otherwise."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def load_backend(name: str, config: BackendConfig) -> ScoringBackend:
    if name == "auto":
        name = default_backend()
    return BACKENDS.get(name)(config)


__all__ = ["BACKENDS", "BackendConfig", "ScoreRequest", "ScoringBackend", "load_backend", "default_backend"]
