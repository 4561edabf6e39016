"""Several selection strategies side by side on one scored pool: what each keeps, and how they overlap.

Pure: rows (grape.strategies.ScoredItem, in upload order, with the extra task results the strategies
need) in, a plain dict out (the body of `GET /v1/datasets/{id}/compare`), and `format_table` for people.
A pair is (item id, candidate index); response length is counted in target-model tokens (the logprob
task's `tokens`) and in characters.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from grape.strategies import ScoredItem, SelectParams, Strategy
from grape.strategies.base import accumulator


class _Counts:
    """One strategy's (or the pool's) running counts: pairs, instructions, lengths and sources."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.selected = 0
        self.tokens = 0
        self.chars = 0
        self.sources: Counter[str] = Counter()
        self.codes = array("q")  # (upload order << 32) | candidate of each pair: overlaps and instructions

    def count(self, order: int, candidate: int, tokens: int, chars: int, source: str) -> None:
        self.selected += 1
        self.tokens += tokens
        self.chars += chars
        self.sources[source] += 1
        self.codes.append((order << 32) | candidate)

    def summary(self, sources: list[str], instructions: int) -> dict[str, Any]:
        n = self.selected
        return {
            "name": self.name,
            "selected": n,
            "instructions": instructions,
            "mean_response_tokens": self.tokens / n if n else None,
            "mean_response_chars": self.chars / n if n else None,
            "sources": {s: self.sources.get(s, 0) / n if n else 0.0 for s in sources},
        }


def _pair(order: int, row: ScoredItem, i: int) -> tuple[int, int, int, str]:
    cand = row.item["candidates"][i]
    return order, int(row.scores[i]["tokens"]), len(cand["response"]), cand["source"]


class Comparison:
    """`compare` over pages of rows fed one at a time (`add`, in upload order): it holds per strategy a few
    counters and one 8-byte code per selected pair (for the overlaps), and what its strategy holds (a pool-wide
    one: its budget's pairs), never the rows."""

    def __init__(self, strategies: Mapping[str, Strategy], params: SelectParams, max_sources: int | None = None):
        self.max_sources = max_sources
        self.items = 0
        self.in_pool: Counter[str] = Counter()
        self.pool = _Counts("pool")
        self.pool_instructions = 0
        self._orders: dict[int, int] = {}
        keep = self._keep
        self.runs = [(_Counts(name), accumulator(select, params, keep)) for name, select in strategies.items()]

    def _keep(self, row: ScoredItem, i: int) -> tuple[int, int, int, str]:
        return _pair(self._orders[id(row)], row, i)

    def add(self, rows: Sequence[ScoredItem]) -> None:
        self._orders = {id(row): self.items + j for j, row in enumerate(rows)}
        pool = self.pool  # every pair: counted, never coded (the pool has no overlaps)
        for row in rows:
            cands = row.item["candidates"]
            self.in_pool.update(c["source"] for c in cands)
            scored = cands[: len(row.scores)]
            pool.selected += len(scored)
            pool.tokens += sum(int(sc["tokens"]) for sc in row.scores)
            pool.chars += sum(len(c["response"]) for c in scored)
            pool.sources.update(c["source"] for c in scored)
            self.pool_instructions += 1 if row.scores else 0
        for counts, acc in self.runs:
            for c in acc.add(rows):
                counts.count(*c.ref[:1], c.candidate, *c.ref[1:])
        self.items += len(rows)
        self._orders = {}

    def result(self) -> dict[str, Any]:
        import numpy as np

        for counts, acc in self.runs:
            for c in acc.finish():
                counts.count(*c.ref[:1], c.candidate, *c.ref[1:])
        ranked = sorted(self.in_pool, key=lambda s: (-self.in_pool[s], s))
        sources = sorted(ranked if self.max_sources is None else ranked[: self.max_sources])
        picked = {counts.name: np.unique(np.frombuffer(counts.codes, dtype=np.int64)) for counts, _ in self.runs}
        summaries = [counts.summary(sources, len(np.unique(picked[counts.name] >> 32))) for counts, _ in self.runs]
        overlap = {
            a: {
                b: len(picked[a]) if a == b else int(np.intersect1d(picked[a], picked[b], assume_unique=True).size)
                for b in picked
            }
            for a in picked
        }
        return {
            "items": self.items,
            "sources": sources,
            "sources_total": len(self.in_pool),
            "pool": self.pool.summary(sources, self.pool_instructions),
            "strategies": summaries,
            "overlap": overlap,
        }


def compare(
    rows: Sequence[ScoredItem],
    strategies: Mapping[str, Strategy],
    params: SelectParams,
    max_sources: int | None = None,
) -> dict[str, Any]:
    """Run each strategy on the same rows with the same parameters and summarize.

    - `pool`: every scored pair (the reference row: what choosing at random among all pairs would give).
    - `strategies`: per strategy, pairs selected, instructions covered, mean response length (target
      tokens and characters) and each source's share of the selected pairs.
    - `overlap[a][b]`: pairs selected by both a and b (`overlap[a][a]` is a's count).
    - `sources`: the sources whose shares are shown, by name: all of them, or the `max_sources` with the
      most candidates in the pool (so the answer stays small on a pool with a source per pair);
      `sources_total` counts them all.

    One pass (`Comparison`): fed page by page, it never holds the pool.
    """
    comparison = Comparison(strategies, params, max_sources)
    comparison.add(rows)
    return comparison.result()


def format_table(result: Mapping[str, Any]) -> str:
    """The comparison as two plain-text tables: per strategy, then the pairwise overlap."""
    sources = list(result["sources"])
    head = ["strategy", "selected", "instr.", "mean tok", "mean chars", *sources]
    lines = []
    for s in [*result["strategies"], result["pool"]]:
        tok, chars = s["mean_response_tokens"], s["mean_response_chars"]
        lines.append(
            [
                s["name"],
                str(s["selected"]),
                str(s["instructions"]),
                "-" if tok is None else f"{tok:.1f}",
                "-" if chars is None else f"{chars:.0f}",
                *(f"{s['sources'][src]:.1%}" for src in sources),
            ]
        )
    out = [_grid(head, lines, left=1)]
    names = [s["name"] for s in result["strategies"]]
    if names:
        rows = [[a, *(str(result["overlap"][a][b]) for b in names)] for a in names]
        out.append("pairs selected by both (row x column):")
        out.append(_grid(["", *names], rows, left=1))
    return "\n\n".join(out)


def _grid(head: list[str], rows: list[list[str]], left: int) -> str:
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if c < left else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(head), *(line(r) for r in rows)])
