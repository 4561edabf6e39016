"""The null backend: every response token gets log-prob 0.0, at once. For benchmarks only.

It loads the model's tokenizer (the worker still tokenizes, checks lengths and writes results as for a
real model), so a worker on it measures everything but the model: Redis, the loop, tokenization and
the result writes. Its scores are meaningless; it is never chosen by `auto`, only by name
(`grape worker --backend null`).
"""

from __future__ import annotations

import logging
from typing import Any

from workers.backends.base import BackendConfig, ScoreRequest

log = logging.getLogger(__name__)


class NullBackend:
    name = "null"

    def __init__(self, config: BackendConfig) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        model_config = AutoConfig.from_pretrained(config.model)
        model_config = getattr(model_config, "get_text_config", lambda: model_config)()
        context = getattr(model_config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(config.max_model_len or context, context)
        log.warning("null backend: every score is 0.0 (benchmarks only; do not select from these scores)")

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        return [[0.0] * len(r.response_ids) for r in requests]

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.config.model, "dtype": "none", "path": "null (no model)"}
