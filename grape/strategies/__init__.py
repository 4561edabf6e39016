"""Selection strategies, registered by name. Each one file, a pure function over stored scores."""

from __future__ import annotations

from grape.registry import Registry
from grape.strategies.base import Pick, ScoredItem, SelectParams, Strategy

STRATEGIES: Registry[Strategy] = Registry("strategy")
STRATEGIES.register("grape", "grape.strategies.grape:select")


def get_strategy(name: str) -> Strategy:
    return STRATEGIES.get(name)


__all__ = ["STRATEGIES", "Pick", "ScoredItem", "SelectParams", "Strategy", "get_strategy"]
