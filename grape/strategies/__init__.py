"""Selection strategies, registered by name. Each one file, a pure function over stored scores."""

from __future__ import annotations

from grape.registry import Registry
from grape.strategies.base import Pick, ScoredItem, SelectParams, Strategy

STRATEGIES: Registry[Strategy] = Registry("strategy")
STRATEGIES.register("grape", "grape.strategies.grape:select")
STRATEGIES.register("longest", "grape.strategies.longest:select")
STRATEGIES.register("deita", "grape.strategies.deita:select")
STRATEGIES.register("ifd", "grape.strategies.ifd:select")
STRATEGIES.register("random", "grape.strategies.random:select")
STRATEGIES.register("lalp", "grape.strategies.lalp:select")
STRATEGIES.register_family("source", "grape.strategies.source:named")  # source:<name>


def get_strategy(name: str) -> Strategy:
    return STRATEGIES.get(name)


def strategy_needs(name: str) -> tuple[str, ...]:
    """The extra tasks (grape.score_kinds) whose results a strategy reads, beyond the logprob scores."""
    return tuple(getattr(get_strategy(name), "needs", ()))


__all__ = ["STRATEGIES", "Pick", "ScoredItem", "SelectParams", "Strategy", "get_strategy", "strategy_needs"]
