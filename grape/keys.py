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
{p}:ds:{id}:{result}              hash   extra tasks (grape.tasks): unconditioned, ratings, embeddings
{p}:ds:{id}:{result}:failed       hash   item id -> reason, per extra task
{p}:ds:{id}:{result}:stats        hash   counters of an extra task (same fields as stats)
{p}:q:{task}:{model}              stream work queue of an extra task on one model (a model key has no ':')
{p}:dead:{task}:{model}           stream dead letters of an extra task
{p}:worker:{name}                 string worker heartbeat JSON, with a TTL
{p}:jobs                          zset   training job id -> creation time
{p}:jobs:queue                    list   queued training job ids (LPUSH in, BLMOVE out from the right)
{p}:jobs:claimed:{trainer}        list   jobs a trainer took from the queue and runs (reaped when it dies)
{p}:job:{id}                      hash   training job record (grape.jobs): spec, state, progress, checkpoints
{p}:job:{id}:log                  stream training job log records
{p}:job:{id}:cancel               string "cancel" (stop, save, cancelled) or "requeue" (stop, save, queue again)
{p}:trainer:{name}                string trainer heartbeat JSON, with a TTL
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

    # per task (grape.tasks.Task): the logprob task keeps the keys above, the others get their own
    def task_stream(self, task: str, model: str) -> str:
        return self.stream(model) if task == "logprob" else f"{self.prefix}:q:{task}:{model_key(model)}"

    def task_dead(self, task: str, model: str) -> str:
        return self.dead(model) if task == "logprob" else f"{self.prefix}:dead:{task}:{model_key(model)}"

    def task_results(self, ds: str, task: str) -> str:
        from grape.tasks import RESULT_NAME, Task

        return self.scores(ds) if task == "logprob" else f"{self.prefix}:ds:{ds}:{RESULT_NAME[Task(task)]}"

    def task_failed(self, ds: str, task: str) -> str:
        return self.failed(ds) if task == "logprob" else f"{self.task_results(ds, task)}:failed"

    def task_stats(self, ds: str, task: str) -> str:
        return self.stats(ds) if task == "logprob" else f"{self.task_results(ds, task)}:stats"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def workers_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    def workers(self) -> str:
        """zset: worker name -> time of its last heartbeat (so nobody has to SCAN the keyspace)."""
        return f"{self.prefix}:workers"

    # training jobs (grape.jobs) ------------------------------------------------------------------
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    def job_queue(self) -> str:
        return f"{self.prefix}:jobs:queue"

    def job_claimed(self, trainer: str) -> str:
        return f"{self.prefix}:jobs:claimed:{trainer}"

    def job_claimed_pattern(self) -> str:
        return f"{self.prefix}:jobs:claimed:*"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def job_log(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:log"

    def job_cancel(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:cancel"

    def trainer(self, name: str) -> str:
        return f"{self.prefix}:trainer:{name}"
