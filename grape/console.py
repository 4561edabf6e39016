"""Terminal output shared by the `grape` commands (grape.cli) and the demo (grape.demo).

Below both so that neither imports the other: the CLI starts the demo, and the demo prints with these."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson


def print_wins(path: Path) -> None:
    """How many records of a selected set (JSONL with a `source` field) came from each source, and the share."""
    wins: Counter[str] = Counter()
    with open(path, "rb") as f:
        for line in f:
            wins[orjson.loads(line)["source"]] += 1
    total = sum(wins.values()) or 1
    width = max([len(s) for s in wins] + [6])
    print(f"\n{'source':<{width}}  selected  share")
    for source, n in wins.most_common():
        print(f"{source:<{width}}  {n:>8}  {n / total:>5.1%}")
