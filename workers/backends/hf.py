"""The transformers scoring backend: one padded forward per token-budget batch.

The vocabulary projection runs only at the positions that predict response tokens, in chunks, with
logsumexp instead of a materialized log-softmax: prompt rows never touch the (possibly 128K-wide)
vocabulary matrix.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from workers.backends.base import BackendConfig, ScoreRequest
from workers.batching import budget_batches

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROJECTION_ROWS = 2048  # rows per vocabulary-projection chunk: bounds the logits tensor


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class HFBackend:
    name = "hf"

    def __init__(self, config: BackendConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.device = pick_device(config.device)
        dtype = _DTYPES.get(config.dtype, "auto")
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(self.device).eval()
        context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(config.max_model_len or context, context)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.dtype = str(self.model.dtype).removeprefix("torch.")

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.config.model,
            "dtype": self.dtype,
            "device": str(self.device),
            "path": "padded-forward+response-rows-projection",
            "max_model_len": self.max_model_len,
        }

    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        out: list[list[float] | None] = [None] * len(requests)
        for batch in budget_batches(requests, lambda r: r.length, self.config.batch_tokens):
            for i, lp in zip(batch, self._score_batch([requests[i] for i in batch]), strict=True):
                out[i] = lp
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """log p(t | prompt) for each t in `token_ids`, at the position after each prompt (the rating task:
        one forward per prompt, the vocabulary projection at its last row only)."""
        out: list[list[float] | None] = [None] * len(prompts)
        wanted = torch.tensor(token_ids, device=self.device)
        for batch in budget_batches(prompts, len, self.config.batch_tokens):
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                ids[b, : len(prompts[i])] = torch.tensor(prompts[i])
                mask[b, : len(prompts[i])] = 1
            hidden = self.model.base_model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).last_hidden_state
            last = hidden[torch.arange(len(batch)), torch.tensor([len(prompts[i]) - 1 for i in batch])]
            logits = self.model.get_output_embeddings()(last).float()
            logprobs = (logits[:, wanted] - torch.logsumexp(logits, dim=-1, keepdim=True)).cpu().tolist()
            for i, lp in zip(batch, logprobs, strict=True):
                out[i] = lp
        return out  # type: ignore[return-value]

    def _score_batch(self, reqs: list[ScoreRequest]) -> list[list[float]]:
        width = max(r.length for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        rows: list[torch.Tensor] = []  # flat (batch, position) of rows that predict a response token
        targets: list[int] = []
        for b, r in enumerate(reqs):
            seq = r.prompt_ids + r.response_ids
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            p = len(r.prompt_ids)
            # position t predicts token t+1; response token j sits at p+j, predicted by row p+j-1
            rows.append(b * width + torch.arange(p - 1, p + len(r.response_ids) - 1))
            targets.extend(r.response_ids)
        hidden = self.model.base_model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1])[torch.cat(rows).to(self.device)]
        logprobs = self._target_logprobs(picked, torch.tensor(targets, device=self.device))
        result: list[list[float]] = []
        start = 0
        flat = logprobs.tolist()
        for r in reqs:
            result.append(flat[start : start + len(r.response_ids)])
            start += len(r.response_ids)
        return result

    def _target_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        parts = []
        for s in range(0, hidden.shape[0], _PROJECTION_ROWS):
            logits = head(hidden[s : s + _PROJECTION_ROWS]).float()
            tgt = targets[s : s + _PROJECTION_ROWS]
            parts.append(logits.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1))
        return torch.cat(parts).cpu()
