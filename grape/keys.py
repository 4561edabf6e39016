"""The Redis key layout, in one place. Every process builds keys through `Keys`.

{p}:datasets                      zset   dataset id -> creation time
{p}:ds:{id}                       hash   dataset metadata (name, target_model, template, created)
{p}:ds:{id}:items                 hash   item id -> item JSON (instruction/messages + candidates)
{p}:ds:{id}:order                 list   item ids in upload order
{p}:ds:{id}:scores                hash   item id -> per-candidate scores JSON
{p}:ds:{id}:failed                hash   item id -> reason
{p}:ds:{id}:stats                 hash   counters (items, candidates, scored, failed, tokens, t_first, t_last)
{p}:q:{model}                     stream work queue of one target model; entry = one chunk of item ids
{p}:dead:{model}                  stream chunks that failed too often, with the reason
{p}:worker:{name}                 string worker heartbeat JSON, with a TTL
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GROUP = "scorers"

_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]+")


def model_key(model: str) -> str:
    """The queue name of a target model: the name as given, minus characters awkward in keys."""
    return _UNSAFE.sub("_", model.strip())


@dataclass(frozen=True)
class Keys:
    prefix: str = "grape"

    def datasets(self) -> str:
        return f"{self.prefix}:datasets"

    def dataset(self, ds: str) -> str:
        return f"{self.prefix}:ds:{ds}"

    def items(self, ds: str) -> str:
        return f"{self.prefix}:ds:{ds}:items"

    def order(self, ds: str) -> str:
        return f"{self.prefix}:ds:{ds}:order"

    def scores(self, ds: str) -> str:
        return f"{self.prefix}:ds:{ds}:scores"

    def failed(self, ds: str) -> str:
        return f"{self.prefix}:ds:{ds}:failed"

    def stats(self, ds: str) -> str:
        return f"{self.prefix}:ds:{ds}:stats"

    def stream(self, model: str) -> str:
        return f"{self.prefix}:q:{model_key(model)}"

    def dead(self, model: str) -> str:
        return f"{self.prefix}:dead:{model_key(model)}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def workers_pattern(self) -> str:
        return f"{self.prefix}:worker:*"
