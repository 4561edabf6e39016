"""LALP, local step scoring (Just, Ko, Jia, "The Signal is in the Steps: Local Scoring for Reasoning Data
Selection", arXiv 2510.03988; first titled "Local Naturalness for Selecting Teacher Data").

A response is cut into reasoning steps; each step is scored by the target model's mean token log-prob
given only the prompt rendering and at most `window` preceding steps, and the candidate's local score is
the mean of its step scores (every step counts the same, whatever its length). This module is the
shared, model-free half: segmentation, the token ids of every step's request, and the aggregate. The
worker runner (workers/runners/local.py), the tests and the bench all build requests here.

Segmentation (`segmentation`, stored with the dataset):
- `blank_line` (default): a step ends at a blank line (a newline followed by one or more lines holding
  only spaces/tabs, then a newline), the usual paragraph break of long reasoning traces.
- `line`: a step ends at every newline (blank lines after it belong to the same break).
The separator stays at the END of the step it closes, so the step texts concatenate back to the response
exactly. A piece that holds only whitespace (a leading break, a trailing break) is never a step of its
own: it is merged into the step before it (or, at the very start, the step after it). So there are no
empty steps, and a response with no break is one step.

Tokens: step 0 is tokenized exactly as the logprob task tokenizes a whole response
(grape.formatting.response_ids: in the `plain` template with the leading space), every later step on its
own (`tokenizer(step, add_special_tokens=False)`). The request of step i is
`prompt_ids + ids(step i-w) + ... + ids(step i-1)` as context and `ids(step i)` as the scored tokens: the
same ids for a step whether it is scored or is context, and exact step boundaries. A one-step response's
request is therefore exactly the logprob task's request, so its local score equals its GRAPE mean. (The
concatenated step ids can differ from the ids of the whole response tokenized at once where a BPE merge
would cross a step break; the steps are scored as the ids above.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SEGMENTATIONS: dict[str, re.Pattern[str]] = {
    "blank_line": re.compile(r"\n(?:[ \t]*\n)+"),
    "line": re.compile(r"\n(?:[ \t]*\n)*"),
}
DEFAULT_SEGMENTATION = "blank_line"
DEFAULT_WINDOW = 2
"""Preceding steps a step is conditioned on (besides the prompt). The paper's exact default is not in
the material we could read; 2 is our choice (a short local window), stored per dataset and settable."""
MAX_WINDOW = 32
MAX_STEPS = 1024
"""Steps per candidate: past it the item fails with its reason (each step is one forward over
prompt + window + step, so an unbounded count is an unbounded cost)."""


@dataclass(frozen=True)
class LocalParams:
    segmentation: str = DEFAULT_SEGMENTATION
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if self.segmentation not in SEGMENTATIONS:
            raise ValueError(f"local_segmentation must be one of {', '.join(SEGMENTATIONS)}, not {self.segmentation!r}")
        if not 1 <= self.window <= MAX_WINDOW:
            raise ValueError(f"local_window must be in 1..{MAX_WINDOW}, not {self.window}")

    def fields(self) -> dict[str, str]:
        """The dataset metadata fields that hold these parameters."""
        return {"local_segmentation": self.segmentation, "local_window": str(self.window)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, str]) -> LocalParams:
        return cls(
            meta.get("local_segmentation") or DEFAULT_SEGMENTATION, int(meta.get("local_window") or DEFAULT_WINDOW)
        )


def split_steps(text: str, segmentation: str = DEFAULT_SEGMENTATION) -> list[str]:
    """The response's steps; `"".join(steps) == text`, no step is whitespace only (unless the whole text is)."""
    pattern = SEGMENTATIONS[segmentation]
    pieces: list[str] = []
    last = 0
    for m in pattern.finditer(text):
        pieces.append(text[last : m.end()])
        last = m.end()
    pieces.append(text[last:])
    steps: list[str] = []
    for piece in pieces:
        if steps and (not piece.strip() or not steps[-1].strip()):
            steps[-1] += piece  # a whitespace-only piece joins its neighbour: no empty steps
        else:
            steps.append(piece)
    return [s for s in steps if s] or [text]


def step_ids(tokenizer: Any, response: str, template: Any, segmentation: str) -> list[list[int]]:
    """Token ids of each step (step 0 as grape.formatting.response_ids, the others on their own)."""
    from grape.formatting import response_ids

    steps = split_steps(response, segmentation)
    first = response_ids(tokenizer, steps[0], template)
    rest = [[int(i) for i in tokenizer(s, add_special_tokens=False)["input_ids"]] for s in steps[1:]]
    return [first, *rest]


def window_requests(prompt: list[int], steps: list[list[int]], window: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, scored ids) of every step: the prompt plus at most `window` preceding steps."""
    out = []
    for i, ids in enumerate(steps):
        context = list(prompt)
        for prev in steps[max(0, i - window) : i]:
            context += prev
        out.append((context, list(ids)))
    return out


def aggregate(step_logprobs: list[list[float]]) -> dict[str, float | int]:
    """The candidate's stored numbers from its steps' token log-probs: `local` (mean of the step means),
    `steps`, `step_min`, `step_max`, `tokens` (scored tokens, all steps)."""
    means = [sum(lps) / len(lps) for lps in step_logprobs]
    return {
        "local": sum(means) / len(means),
        "steps": len(means),
        "step_min": min(means),
        "step_max": max(means),
        "tokens": sum(len(lps) for lps in step_logprobs),
    }
