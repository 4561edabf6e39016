"""The Redis key layout, in one place. Every process builds keys through `Keys`.

{p}:datasets                      zset   dataset id -> creation time
{p}:ds:{id}                       hash   dataset metadata (name, target_model, template, created)
{p}:ds:{id}:items                 hash   item id -> item record (JSON, zstd-compressed: grape.store.codec)
{p}:ds:{id}:order                 list   item ids in upload order
{p}:ds:{id}:scores                hash   item id -> per-candidate scores (field names once: grape.store.codec)
{p}:ds:{id}:facts                 hash   item id -> per-candidate source and response length (grape.store.facts)
{p}:ds:{id}:summary:{reduce}      hash   the kept /summary tally (grape.store.summaries): gen, pos, state
{p}:ds:{id}:summary:{reduce}:{s}  string its scores (s = all, chosen): float64s, appended as scores arrive
{p}:ds:{id}:failed                hash   item id -> reason
{p}:ds:{id}:stats                 hash   counters (items, candidates, scored, failed, tokens, t_start, t_last)
{p}:q:{model}                     stream work queue of one target model (model_key); entry = one chunk of item ids
{p}:ring:{model}                  list   fair share: datasets with chunks in their backlog for this queue, in turn
{p}:waiting:{model}               string fair share: chunks in the backlogs of this queue (all datasets)
{p}:ds:{id}:backlog               list   fair share: the dataset's chunks not yet in the queue stream (item ids JSON)
{p}:dead:{model}                  stream chunks that failed too often, with the reason
{p}:ds:{id}:{result}              hash   extra tasks (grape.score_kinds): unconditioned, ratings, embeddings
{p}:ds:{id}:{result}:failed       hash   item id -> reason, per extra task
{p}:ds:{id}:{result}:stats        hash   counters of an extra task (same fields as stats)
{p}:q:{task}:{model}              stream work queue of an extra task on one model (a model key has no ':')
{p}:ring:{task}:{model}           list   its ring, {p}:waiting:{task}:{model} its count, {p}:ds:{id}:backlog:{task}
{p}:dead:{task}:{model}           stream dead letters of an extra task
{p}:worker:{name}                 string worker heartbeat JSON, with a TTL
{p}:jobs                          zset   training job id -> creation time
{p}:jobs:queue                    list   queued training job ids (LPUSH in, BLMOVE out from the right)
{p}:jobs:claimed:{trainer}        list   jobs a trainer took from the queue and runs (reaped when it dies)
{p}:jobs:deleted                  zset   deleted job id -> time (trainers remove its directory; kept a day)
{p}:jobs:finished                 zset   job id -> when it ended (GRAPE_RETENTION_DAYS: the gateway removes old ones)
{p}:job:{id}                      hash   training job record (grape.jobs): spec, state, progress, checkpoints
{p}:job:{id}:log                  stream training job log records
{p}:job:{id}:cancel               string "cancel" (stop, save, cancelled) or "requeue" (stop, save, queue again)
{p}:trainer:{name}                string trainer heartbeat JSON, with a TTL
{p}:evals                         zset   evaluation id -> creation time
{p}:evals:queue                   list   queued evaluation ids (LPUSH in, BLMOVE out from the right)
{p}:evals:claimed:{evaluator}     list   evaluations an evaluator took from the queue and runs
{p}:evals:finished                zset   evaluation id -> when it ended (retention, as jobs:finished)
{p}:evals:tasks                   set    lm-eval task names the evaluators offer (allowed; published at start)
{p}:evals:tasks:dir               set    task names of the evaluators' GRAPE_EVAL_TASK_DIR (published at start)
{p}:evals:tasks:refused           hash   task name -> why the evaluators do not offer it (subtasks, unsafe code)
{p}:eval:{id}                     hash   evaluation record (grape.evaluations): spec, state, results
{p}:eval:{id}:log                 stream evaluation log records
{p}:eval:{id}:cancel              string "cancel" (stop lm-eval, cancelled) or "requeue" (stop, queue again)
{p}:evaluator:{name}              string evaluator heartbeat JSON, with a TTL
{p}:evaluators                    zset   evaluator name -> time of its last heartbeat
{p}:experiments                   zset   experiment id -> creation time
{p}:experiments:active            set    experiments not finished yet (the driver advances these)
{p}:experiments:finished          zset   experiment id -> when it ended (retention, as jobs:finished)
{p}:exp:{id}                      string experiment record JSON (grape.experiments)
{p}:exp:{id}:lock                 string held by the process advancing the experiment (short TTL)
{p}:exp:{id}:arm:{i}              string the selection arm i trains on, NDJSON (kept: it is part of the result)
{p}:tenants                       set    tenant names that own something (GET /v1/usage of an admin lists them)
{p}:tenant:{t}:{kind}             zset   a tenant's ids of one kind (datasets, jobs, evals, experiments) -> created
{p}:tenant:{t}:{kind}:active      set    a tenant's queued/running ids of a kind (pruned when read: grape.store.tenants)
{p}:tenant:{t}:usage              hash   stored_pairs: candidates in the tenant's datasets (ingest and delete scripts)
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from grape.score_kinds import RESULT_NAME, ScoreTask

GROUP = "scorers"

# Ids the gateway makes (service.datasets, service.training): a fixed prefix and 12 hex digits. Checked at
# the edge so a path segment like `ds-1:items` can never name another key of the layout below.
DATASET_ID = re.compile(r"ds-[0-9a-f]{12}")
JOB_ID = re.compile(r"job-[0-9a-f]{12}")

# characters a model name may keep in its queue key as they are (no ':', the key separator; no '%')
_SAFE = re.compile(r"[A-Za-z0-9._/-]+")


def new_dataset_id() -> str:
    return f"ds-{uuid.uuid4().hex[:12]}"


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:12]}"


def is_dataset_id(value: str) -> bool:
    return DATASET_ID.fullmatch(value) is not None


def is_job_id(value: str) -> bool:
    return JOB_ID.fullmatch(value) is not None


def model_key(model: str) -> str:
    """The queue name of a target model, one to one: a name of only `[A-Za-z0-9._/-]` is kept as it is
    (the keys of existing deployments do not move); any other name is percent-encoded (UTF-8, `%XX`),
    so it contains a `%` that no kept name has. `org/model:v1` -> `org/model%3Av1`, `org/model_v1` stays.
    Surrounding whitespace is not part of a name (the API strips it too)."""
    name = model.strip()
    if _SAFE.fullmatch(name):
        return name
    return "".join(
        ch if _SAFE.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")) for ch in name
    )


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

    def facts(self, ds: str) -> str:
        return f"{self.prefix}:ds:{ds}:facts"

    def summary(self, ds: str, reduce: str, part: str = "") -> str:
        """The kept summary tally of one `reduce` (a hash), or one of its score arrays (`part`: all, chosen)."""
        return f"{self.prefix}:ds:{ds}:summary:{reduce}" + (f":{part}" if part else "")

    def stats(self, ds: str) -> str:
        return f"{self.prefix}:ds:{ds}:stats"

    def stream(self, model: str) -> str:
        return f"{self.prefix}:q:{model_key(model)}"

    def dead(self, model: str) -> str:
        return f"{self.prefix}:dead:{model_key(model)}"

    # per task (grape.score_kinds.ScoreTask): the logprob task keeps the keys above, the others get their own
    def task_stream(self, task: str, model: str) -> str:
        return self.stream(model) if task == "logprob" else f"{self.prefix}:q:{task}:{model_key(model)}"

    def score_queue(self, task: str, model: str) -> ScoreQueue:
        """The keys of a task's queue on a model, its fair share included (grape.store.scoring)."""
        suffix = model_key(model) if task == "logprob" else f"{task}:{model_key(model)}"
        tail = ":backlog" if task == "logprob" else f":backlog:{task}"
        return ScoreQueue(
            self.task_stream(task, model), f"{self.prefix}:ring:{suffix}", f"{self.prefix}:waiting:{suffix}",
            f"{self.prefix}:ds:", tail,
        )  # fmt: skip

    def backlog(self, ds: str, task: str) -> str:
        """list: a dataset's chunks of a task not yet moved into the task's stream (fair share)."""
        return f"{self.prefix}:ds:{ds}:backlog" + ("" if task == "logprob" else f":{task}")

    def task_dead(self, task: str, model: str) -> str:
        return self.dead(model) if task == "logprob" else f"{self.prefix}:dead:{task}:{model_key(model)}"

    def task_results(self, ds: str, task: str) -> str:
        return self.scores(ds) if task == "logprob" else f"{self.prefix}:ds:{ds}:{RESULT_NAME[ScoreTask(task)]}"

    def task_failed(self, ds: str, task: str) -> str:
        return self.failed(ds) if task == "logprob" else f"{self.task_results(ds, task)}:failed"

    def task_stats(self, ds: str, task: str) -> str:
        return self.stats(ds) if task == "logprob" else f"{self.task_results(ds, task)}:stats"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def workers(self) -> str:
        """zset: worker name -> time of its last heartbeat (so nobody has to SCAN the keyspace)."""
        return f"{self.prefix}:workers"

    # the job queues (grape.store.jobqueue): training jobs and evaluations, one layout each --------
    @property
    def training(self) -> QueueKeys:
        return QueueKeys(self.prefix, "jobs", "job", "trainer")

    @property
    def evaluations(self) -> QueueKeys:
        return QueueKeys(self.prefix, "evals", "eval", "evaluator")

    def eval_tasks(self) -> str:
        """set: lm-eval task names the evaluators can run (published at start)."""
        return f"{self.prefix}:evals:tasks"

    def eval_dir_tasks(self) -> str:
        """set: the task names of the evaluators' GRAPE_EVAL_TASK_DIR (allowed when GRAPE_EVAL_TASKS is unset)."""
        return f"{self.prefix}:evals:tasks:dir"

    def eval_refused_tasks(self) -> str:
        """hash: task name -> why the evaluators do not offer it though GRAPE_EVAL_TASKS allows it."""
        return f"{self.prefix}:evals:tasks:refused"

    # experiments (grape.experiments) -------------------------------------------------------------
    def experiments(self) -> str:
        return f"{self.prefix}:experiments"

    def experiments_active(self) -> str:
        return f"{self.prefix}:experiments:active"

    def experiments_finished(self) -> str:
        """zset: experiment id -> when it ended (GRAPE_RETENTION_DAYS)."""
        return f"{self.prefix}:experiments:finished"

    def experiment(self, exp_id: str) -> str:
        return f"{self.prefix}:exp:{exp_id}"

    def experiment_lock(self, exp_id: str) -> str:
        return f"{self.prefix}:exp:{exp_id}:lock"

    def experiment_selection(self, exp_id: str, arm: int) -> str:
        return f"{self.prefix}:exp:{exp_id}:arm:{arm}"

    # tenants (grape.tenancy, grape.store.tenants): a tenant name is [a-z0-9_-], never a ':' ---------
    def tenants(self) -> str:
        return f"{self.prefix}:tenants"

    def tenant_ids(self, tenant: str, kind: str) -> str:
        """zset: the ids of one kind (`datasets`, `jobs`, `evals`, `experiments`) a tenant owns -> created."""
        return f"{self.prefix}:tenant:{tenant}:{kind}"

    def tenant_active(self, tenant: str, kind: str) -> str:
        """set: a tenant's ids of a kind that are (or were, until pruned) queued or running."""
        return f"{self.prefix}:tenant:{tenant}:{kind}:active"

    def tenant_usage(self, tenant: str) -> str:
        """hash: a tenant's counters kept by scripts (stored_pairs)."""
        return f"{self.prefix}:tenant:{tenant}:usage"


@dataclass(frozen=True)
class ScoreQueue:
    """One scoring queue (a task on a model): the stream workers read, and its fair share: the ring of datasets
    with chunks waiting, the count of those chunks, and each dataset's backlog list (`backlog_head` + dataset
    id + `backlog_tail`, so a script can name the backlog of any dataset the ring holds)."""

    stream: str
    ring: str
    waiting: str
    backlog_head: str
    backlog_tail: str

    def backlog(self, ds: str) -> str:
        return f"{self.backlog_head}{ds}{self.backlog_tail}"


@dataclass(frozen=True)
class QueueKeys:
    """The key space of one job queue (grape.store.jobqueue): `Keys.training` (plural `jobs`, one `job`, held
    by a `trainer`) or `Keys.evaluations` (`evals`, `eval`, `evaluator`); see the layout above."""

    prefix: str
    plural: str
    single: str
    holder_kind: str

    def ids(self) -> str:
        """zset: id -> creation time."""
        return f"{self.prefix}:{self.plural}"

    def queue(self) -> str:
        return f"{self.prefix}:{self.plural}:queue"

    def claimed(self, holder: str) -> str:
        return f"{self.prefix}:{self.plural}:claimed:{holder}"

    def claimed_pattern(self) -> str:
        return f"{self.prefix}:{self.plural}:claimed:*"

    def deleted(self) -> str:
        return f"{self.prefix}:{self.plural}:deleted"

    def finished(self) -> str:
        """zset: id -> when the record reached a terminal state (GRAPE_RETENTION_DAYS: removed after it)."""
        return f"{self.prefix}:{self.plural}:finished"

    def record(self, item_id: str) -> str:
        return f"{self.prefix}:{self.single}:{item_id}"

    def log(self, item_id: str) -> str:
        return f"{self.prefix}:{self.single}:{item_id}:log"

    def cancel(self, item_id: str) -> str:
        return f"{self.prefix}:{self.single}:{item_id}:cancel"

    def holder(self, name: str) -> str:
        """string: a holder's heartbeat JSON, with a TTL."""
        return f"{self.prefix}:{self.holder_kind}:{name}"

    def holders(self) -> str:
        """zset: holder name -> time of its last heartbeat (evaluators publish it; trainers do not)."""
        return f"{self.prefix}:{self.holder_kind}s"
