"""Several selection strategies side by side on one scored pool: what each keeps, and how they overlap.

Pure: rows (grape.strategies.ScoredItem, in upload order, with the extra task results the strategies
need) in, a plain dict out (the body of `GET /v1/datasets/{id}/compare`), and `format_table` for people.
A pair is (item id, candidate index); response length is counted in target-model tokens (the logprob
task's `tokens`) and in characters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from grape.strategies import ScoredItem, SelectParams, Strategy


def _summary(name: str, pairs: Sequence[tuple[ScoredItem, int]], sources: list[str]) -> dict[str, Any]:
    counts = Counter(row.item["candidates"][i]["source"] for row, i in pairs)
    n = len(pairs)
    return {
        "name": name,
        "selected": n,
        "instructions": len({row.item["id"] for row, _ in pairs}),
        "mean_response_tokens": sum(row.scores[i]["tokens"] for row, i in pairs) / n if n else None,
        "mean_response_chars": sum(len(row.item["candidates"][i]["response"]) for row, i in pairs) / n if n else None,
        "sources": {s: counts.get(s, 0) / n if n else 0.0 for s in sources},
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
    """
    by_id = {row.item["id"]: row for row in rows}
    in_pool = Counter(c["source"] for row in rows for c in row.item["candidates"])
    ranked = sorted(in_pool, key=lambda s: (-in_pool[s], s))
    sources = sorted(ranked if max_sources is None else ranked[:max_sources])
    picked: dict[str, set[tuple[str, int]]] = {}
    summaries = []
    for name, select in strategies.items():
        pairs = [(p.item["id"], p.candidate) for p in select(rows, params)]
        picked[name] = set(pairs)
        summaries.append(_summary(name, [(by_id[i], c) for i, c in pairs], sources))
    pool = _summary("pool", [(row, i) for row in rows for i in range(len(row.scores))], sources)
    overlap = {a: {b: len(picked[a] & picked[b]) for b in picked} for a in picked}
    return {
        "items": len(rows),
        "sources": sources,
        "sources_total": len(in_pool),
        "pool": pool,
        "strategies": summaries,
        "overlap": overlap,
    }


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
