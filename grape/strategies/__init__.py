"""Selection strategies, registered by name. Each one file: a pure function over stored scores and its record
(`StrategySpec`: name, summary, the scores it reads, how it decides, the parameters it reads)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from grape.registry import Registry
from grape.strategies import deita, grape, ifd, lalp, longest, random, source
from grape.strategies.base import SEED_MAX, Pick, Reduce, ScoredItem, SelectParams, Strategy, StrategySpec

STRATEGIES: Registry[StrategySpec] = Registry("strategy")
"""Registration order is the order of the documentation and the CLI's help."""


def register(spec: StrategySpec) -> None:
    STRATEGIES.register(spec.name, spec)


register(grape.SPEC)
register(longest.SPEC)
register(deita.SPEC)
register(ifd.SPEC)
register(random.SPEC)
register(lalp.SPEC)
STRATEGIES.register_family("source", source.named)  # source:<name>


DEFAULT_STRATEGY = grape.SPEC.name
"""The strategy a selection, a job or an export runs when none is named."""

StrategyName = Annotated[str, Field(min_length=1, max_length=200, description="A selection strategy by name.")]
"""A request's strategy field (checked against the registry where it is used, naming the known ones)."""


def get_strategy(name: str) -> StrategySpec:
    return STRATEGIES.get(name)


def strategy_specs() -> list[StrategySpec]:
    """Every strategy's record in registry order; a family as its template (`source:<name>`)."""
    return [STRATEGIES.get(name) for name in STRATEGIES.in_order()]


def strategy_needs(name: str) -> tuple[str, ...]:
    """The extra tasks (grape.score_kinds) whose results a strategy reads, beyond the logprob scores."""
    return get_strategy(name).needs


def reading(param: str) -> list[str]:
    """The strategies that read a selection parameter (a field of `SelectParams`), in registry order."""
    return [s.name for s in strategy_specs() if param in s.params]


__all__ = [
    "DEFAULT_STRATEGY",
    "SEED_MAX",
    "STRATEGIES",
    "Pick",
    "Reduce",
    "ScoredItem",
    "SelectParams",
    "Strategy",
    "StrategyName",
    "StrategySpec",
    "get_strategy",
    "reading",
    "register",
    "strategy_needs",
    "strategy_specs",
]
