"""The transformers scoring backend.

Two things make it cheaper than the naive padded forward (lm-evaluation-harness style), with the same
scores:
- Each distinct prompt runs once. Candidates of one instruction share it: its KV cache is computed in a
  prefix pass over the batch's distinct prompts, gathered to one row per candidate, and the responses run
  on top of it with explicit position ids (`path = shared-prefix`).
- The vocabulary projection runs only at the rows that predict response tokens, in chunks, with
  logsumexp instead of a materialized log-softmax: prompt rows never touch the (possibly 128K-wide)
  vocabulary matrix.
`extra={"share_prefix": False}` turns the first off (one padded forward per batch, `path = padded`).
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
        self.share_prefix = bool(config.extra.get("share_prefix", True))

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.config.model,
            "dtype": self.dtype,
            "device": str(self.device),
            "path": ("shared-prefix" if self.share_prefix else "padded") + "+response-rows-projection",
            "max_model_len": self.max_model_len,
        }

    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        out: list[list[float] | None] = [None] * len(requests)
        if not self.share_prefix:
            for batch in budget_batches(requests, lambda r: r.length, self.config.batch_tokens):
                for i, lp in zip(batch, self._score_batch([requests[i] for i in batch]), strict=True):
                    out[i] = lp
            return out  # type: ignore[return-value]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple(r.prompt_ids), []).append(i)
        group_list = list(groups.items())
        for batch in self._group_batches(requests, group_list):
            chosen = [group_list[g] for g in batch]
            flat = [i for _, members in chosen for i in members]
            for i, lp in zip(flat, self._score_shared(requests, chosen), strict=True):
                out[i] = lp
        return out  # type: ignore[return-value]

    def _group_batches(
        self, requests: list[ScoreRequest], groups: list[tuple[tuple[int, ...], list[int]]]
    ) -> list[list[int]]:
        """Batches of prompt groups whose padded attention context (candidates x (prompt + response))
        stays within the token budget, the same bound as the padded path; longest first."""

        def cost(g: int) -> tuple[int, int, int]:
            prompt, members = groups[g]
            return len(prompt), max(len(requests[i].response_ids) for i in members), len(members)

        order = sorted(range(len(groups)), key=lambda g: sum(cost(g)[:2]), reverse=True)
        batches: list[list[int]] = []
        cur: list[int] = []
        p_max = r_max = rows = 0
        for g in order:
            p, r, n = cost(g)
            if cur and (max(p_max, p) + max(r_max, r)) * (rows + n) > self.config.batch_tokens:
                batches.append(cur)
                cur, p_max, r_max, rows = [], 0, 0, 0
            cur.append(g)
            p_max, r_max, rows = max(p_max, p), max(r_max, r), rows + n
        if cur:
            batches.append(cur)
        return batches

    def _score_shared(
        self, requests: list[ScoreRequest], groups: list[tuple[tuple[int, ...], list[int]]]
    ) -> list[list[float]]:
        dev = self.device
        p_lens = [len(prompt) for prompt, _ in groups]
        p_max = max(p_lens)
        prefix = torch.full((len(groups), p_max), self.pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((len(groups), p_max), dtype=torch.long)
        for g, (prompt, _) in enumerate(groups):
            prefix[g, : len(prompt)] = torch.tensor(prompt)
            prefix_mask[g, : len(prompt)] = 1
        pre = self.model.base_model(input_ids=prefix.to(dev), attention_mask=prefix_mask.to(dev), use_cache=True)
        # the last prompt row predicts the first response token
        last_prompt_row = pre.last_hidden_state[torch.arange(len(groups)), torch.tensor(p_lens) - 1]

        members = [(g, i) for g, (_, idx) in enumerate(groups) for i in idx]
        reqs = [requests[i] for _, i in members]
        owner = torch.tensor([g for g, _ in members])
        r_max = max(len(r.response_ids) for r in reqs)
        resp = torch.full((len(reqs), r_max), self.pad_id, dtype=torch.long)
        resp_mask = torch.zeros((len(reqs), r_max), dtype=torch.long)
        for c, r in enumerate(reqs):
            resp[c, : len(r.response_ids)] = torch.tensor(r.response_ids)
            resp_mask[c, : len(r.response_ids)] = 1
        positions = torch.tensor([p_lens[g] for g, _ in members])[:, None] + torch.arange(r_max)[None, :]
        cache = pre.past_key_values
        cache.reorder_cache(owner.to(dev))  # one prefix row per candidate (a gather, not a recompute)
        hidden = self.model.base_model(
            input_ids=resp.to(dev),
            attention_mask=torch.cat([prefix_mask[owner], resp_mask], dim=1).to(dev),
            position_ids=positions.to(dev),
            past_key_values=cache,
            use_cache=False,
        ).last_hidden_state

        rows: list[torch.Tensor] = []
        targets: list[int] = []
        for c, r in enumerate(reqs):
            # token 0 <- last prompt row; token j >= 1 <- response row j-1
            rows.append(last_prompt_row[owner[c]][None, :])
            rows.append(hidden[c, : len(r.response_ids) - 1])
            targets.extend(r.response_ids)
        logprobs = self._target_logprobs(torch.cat(rows), torch.tensor(targets, device=dev)).tolist()
        out: list[list[float]] = []
        start = 0
        for r in reqs:
            out.append(logprobs[start : start + len(r.response_ids)])
            start += len(r.response_ids)
        return out

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
