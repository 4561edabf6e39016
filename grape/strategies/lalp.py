"""LALP (Just, Ko, Jia, "The Signal is in the Steps", arXiv 2510.03988): per instruction, the candidate
with the highest local score (grape.local_steps: the mean over its reasoning steps of the target model's
mean token log-prob of the step given the prompt and a short window of preceding steps).

`k` per instruction, best first; ties go to the earlier candidate. Instructions without local scores (not
scored yet by the local task, or failed there) are left out. `score` is the local score.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from grape.strategies.base import Pick, ScoredItem, SelectParams, StrategySpec, streamed


def select(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    for row in rows:
        local = row.extra.get("local")
        if local is None:
            continue
        ranked = sorted(range(len(local)), key=lambda i: (-float(local[i]["local"]), i))
        for rank, i in enumerate(ranked[: params.k], start=1):
            yield Pick(row.item, i, float(local[i]["local"]), rank)


SPEC = StrategySpec(
    name="lalp",
    summary="Per instruction, the k candidates with the highest local score (LALP: mean step log-prob given a "
    "window of steps).",
    needs=("local",),
    per_instruction=True,
    streams=True,
    params=("k",),
    accumulate=streamed(select),
    texts=False,
    columns=None,
)
