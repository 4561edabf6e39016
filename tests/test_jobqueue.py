"""The job-queue protocol (grape.store.jobqueue) against a real Redis, for both kinds: training jobs and
evaluations go through the same scripts, differing only where the kind says so."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest
import redis.asyncio as aredis

from grape.keys import Keys
from grape.settings import Settings
from grape.store import eval_tasks
from grape.store.consumer import QueueConsumer
from grape.store.io import arun, call, run
from grape.store.jobqueue import CANCEL, EVALUATIONS, REQUEUE, TRAINING, JobQueue, decode_log, log_fields

KINDS = [pytest.param(TRAINING, id="training"), pytest.param(EVALUATIONS, id="evaluations")]


def new(rclient, keys: Keys, queue: JobQueue, *, max_attempts: int = 2, auto_resume: bool = True) -> str:
    prefix = "job" if queue is TRAINING else "ev"
    item_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fields = {"id": item_id, "state": "queued", "spec": '{"x": 1}', "created": f"{time.time():.3f}"}
    fields |= {"attempts": "0", "max_attempts": str(max_attempts), "auto_resume": "1" if auto_resume else "0"}
    assert call(rclient, queue.enqueue(keys, item_id, fields, 100)) == 1
    return item_id


def claim(rclient, keys: Keys, queue: JobQueue, holder: str) -> tuple[str, Any]:
    """What a holder does: BLMOVE the oldest id into its claimed list, then start it."""
    q = queue.space(keys)
    item_id = rclient.lmove(q.queue(), q.claimed(holder), "RIGHT", "LEFT").decode()
    return item_id, call(rclient, queue.start(keys, item_id, holder))


def record(rclient, keys: Keys, queue: JobQueue, item_id: str) -> dict[str, Any]:
    return queue.decode(rclient.hgetall(queue.space(keys).record(item_id)))


def messages(rclient, keys: Keys, queue: JobQueue, item_id: str) -> list[str]:
    rows = rclient.xrange(queue.space(keys).log(item_id))
    return [decode_log(i, f)["msg"] for i, f in rows]


def test_the_key_strings_stay_as_deployed() -> None:
    t, e = Keys("p").training, Keys("p").evaluations
    assert [t.ids(), t.queue(), t.claimed("a"), t.record("j"), t.log("j"), t.cancel("j"), t.holder("a")] == [
        "p:jobs",
        "p:jobs:queue",
        "p:jobs:claimed:a",
        "p:job:j",
        "p:job:j:log",
        "p:job:j:cancel",
        "p:trainer:a",
    ]
    assert t.deleted() == "p:jobs:deleted" and e.holders() == "p:evaluators"
    assert [e.ids(), e.queue(), e.claimed("a"), e.record("v"), e.log("v"), e.cancel("v"), e.holder("a")] == [
        "p:evals",
        "p:evals:queue",
        "p:evals:claimed:a",
        "p:eval:v",
        "p:eval:v:log",
        "p:eval:v:cancel",
        "p:evaluator:a",
    ]


@pytest.mark.parametrize("queue", KINDS)
def test_enqueue_start_finish(rclient, keys: Keys, queue: JobQueue) -> None:
    q = queue.space(keys)
    first, second = new(rclient, keys, queue), new(rclient, keys, queue)
    assert rclient.zcard(q.ids()) == 2 and rclient.llen(q.queue()) == 2
    assert call(rclient, queue.enqueue(keys, "x-1", {"id": "x-1", "state": "queued"}, 2)) == 0  # full
    assert not rclient.exists(q.record("x-1"))

    item_id, spec = claim(rclient, keys, queue, "h1")
    assert item_id == first and spec == b'{"x": 1}'  # oldest first
    rec = record(rclient, keys, queue, first)
    assert (rec["state"], rec[queue.holder], rec["attempts"]) == ("running", "h1", 1)
    assert messages(rclient, keys, queue, first) == ["queued", f"started on {queue.holder} h1 (attempt 1)"]

    # only the holder ends it; results (JSON) are set with the end
    assert call(rclient, queue.finish(keys, first, "other", "succeeded", "done")) == 0
    assert call(rclient, queue.finish(keys, first, "h1", "succeeded", "done", fields={"results": {"a": 1}})) == 1
    rec = record(rclient, keys, queue, first)
    assert rec["state"] == "succeeded" and rec["finished"] > 0
    assert rclient.hget(q.record(first), "results") == b'{"a":1}'
    assert rclient.llen(q.claimed("h1")) == 0
    assert messages(rclient, keys, queue, first)[-1] == "done"
    assert call(rclient, queue.finish(keys, first, "h1", "failed", "again")) == 0  # terminal: stays

    # a record cancelled between the claim and the start is not run, and leaves the claimed list
    assert call(rclient, queue.cancel(keys, second)) == b"cancelled-now"
    rclient.rpush(q.queue(), second)
    assert claim(rclient, keys, queue, "h1") == (second, None)
    assert rclient.llen(q.claimed("h1")) == 0 and record(rclient, keys, queue, second)["state"] == "cancelled"


@pytest.mark.parametrize("queue", KINDS)
def test_a_hand_back_queues_it_again(rclient, keys: Keys, queue: JobQueue) -> None:
    item_id = new(rclient, keys, queue)
    claim(rclient, keys, queue, "h1")
    rclient.set(queue.space(keys).cancel(item_id), "requeue")
    assert call(rclient, queue.finish(keys, item_id, "h1", "queued", "handed back")) == 1
    rec = record(rclient, keys, queue, item_id)
    assert rec["state"] == "queued" and rec[queue.holder] is None
    assert rclient.lrange(queue.space(keys).queue(), 0, -1) == [item_id.encode()]
    assert not rclient.exists(queue.space(keys).cancel(item_id))
    if queue is TRAINING:
        assert (rec["resume"], rec["attempts"]) == ("1", 1)  # the next run resumes from the checkpoint
    else:
        assert rec["attempts"] == 0 and "resume" not in rec  # the attempt is not counted


@pytest.mark.parametrize("queue", KINDS)
def test_cancel_queued_and_running(rclient, keys: Keys, queue: JobQueue) -> None:
    q = queue.space(keys)
    running, queued = new(rclient, keys, queue), new(rclient, keys, queue)
    claim(rclient, keys, queue, "h1")
    assert call(rclient, queue.cancel(keys, queued)) == b"cancelled-now"
    assert rclient.llen(q.queue()) == 0 and record(rclient, keys, queue, queued)["state"] == "cancelled"
    assert messages(rclient, keys, queue, queued)[-1] == "cancelled while queued"

    assert call(rclient, queue.cancel(keys, running)) == b"cancelling"
    assert rclient.get(q.cancel(running)) == b"cancel"
    rec = record(rclient, keys, queue, running)
    assert rec["state"] == "running" and rec["cancel_requested"] > 0
    assert messages(rclient, keys, queue, running)[-1].startswith("cancel requested: ")
    assert call(rclient, queue.finish(keys, running, "h1", "cancelled", "cancelled")) == 1
    assert "cancel_requested" not in rclient.hkeys(q.record(running))
    assert call(rclient, queue.cancel(keys, running)) == b"cancelled"  # already ended: its state
    assert call(rclient, queue.cancel(keys, "nope")) == b"missing"


def test_reap_a_dead_trainer(rclient, keys: Keys) -> None:
    q = keys.training
    plain = new(rclient, keys, TRAINING, auto_resume=False, max_attempts=1)
    resumable = new(rclient, keys, TRAINING, max_attempts=2)
    claim(rclient, keys, TRAINING, "t1")
    claim(rclient, keys, TRAINING, "t2")
    rclient.set(q.holder("t1"), b"{}", ex=30)
    assert call(rclient, TRAINING.reap(keys, plain, "t1")) == b"alive"
    rclient.hset(q.record(plain), "step", 7)
    rclient.delete(q.holder("t1"))
    assert TRAINING.reap_dead(rclient, keys, alive="me") == {plain: "failed", resumable: "resumed"}
    rec = record(rclient, keys, TRAINING, plain)
    assert rec["state"] == "failed"
    assert rec["error"] == "trainer t1 stopped sending heartbeats at step 7 (process died or lost Redis)"
    rec = record(rclient, keys, TRAINING, resumable)
    assert (rec["state"], rec["resume"], rec["trainer"]) == ("queued", "1", None)
    assert messages(rclient, keys, TRAINING, resumable)[-1].endswith(
        "; queued again to resume from its last checkpoint (attempt 1 of 2)"
    )
    assert rclient.llen(q.claimed("t1")) == 0 and rclient.llen(q.claimed("t2")) == 0
    assert rclient.lrange(q.queue(), 0, -1) == [resumable.encode()]
    assert TRAINING.reap_dead(rclient, keys, alive="me") == {}


def test_reap_a_dead_evaluator(rclient, keys: Keys) -> None:
    ev = new(rclient, keys, EVALUATIONS, max_attempts=2)
    for expected in ("requeued", "failed"):
        claim(rclient, keys, EVALUATIONS, "ghost")
        assert EVALUATIONS.reap_dead(rclient, keys, alive="me") == {ev: expected}
    rec = record(rclient, keys, EVALUATIONS, ev)
    assert rec["state"] == "failed"
    assert rec["error"] == "evaluator ghost stopped sending heartbeats (process died or lost Redis) (attempt 2 of 2)"
    assert "queued again to start over (attempt 1 of 2 done)" in messages(rclient, keys, EVALUATIONS, ev)[-3]


@pytest.mark.parametrize("queue", KINDS)
def test_a_dead_holders_cancelled_record_ends_cancelled(rclient, keys: Keys, queue: JobQueue) -> None:
    item_id = new(rclient, keys, queue)
    claim(rclient, keys, queue, "ghost")
    assert call(rclient, queue.cancel(keys, item_id)) == b"cancelling"
    assert call(rclient, queue.reap(keys, item_id, "ghost")) == b"cancelled"
    rec = record(rclient, keys, queue, item_id)
    assert rec["state"] == "cancelled" and rec.get("cancel_requested") is None
    assert not rclient.exists(queue.space(keys).cancel(item_id)) and rclient.llen(queue.space(keys).queue()) == 0


def test_resume_and_delete_a_training_job(rclient, keys: Keys) -> None:
    q = keys.training
    job = new(rclient, keys, TRAINING)
    claim(rclient, keys, TRAINING, "t1")
    assert call(rclient, TRAINING.resume(keys, job)) == b"running"  # only failed or cancelled
    assert call(rclient, TRAINING.delete(keys, job)) == b"running"  # cancel it first
    call(rclient, TRAINING.finish(keys, job, "t1", "failed", "boom", error="boom", level="error"))
    assert call(rclient, TRAINING.resume(keys, job)) == b"queued"
    rec = record(rclient, keys, TRAINING, job)
    assert (rec["state"], rec["attempts"], rec["resume"], rec.get("error")) == ("queued", 0, "1", None)
    assert rclient.lrange(q.queue(), 0, -1) == [job.encode()]

    assert call(rclient, TRAINING.delete(keys, job)) == b"deleted"
    assert not rclient.exists(q.record(job), q.log(job)) and rclient.llen(q.queue()) == 0
    assert rclient.zscore(q.ids(), job) is None and rclient.zscore(q.deleted(), job) is not None
    assert call(rclient, TRAINING.delete(keys, job)) == b"missing"
    assert call(rclient, TRAINING.resume(keys, job)) == b"missing"


@pytest.mark.parametrize("queue", KINDS)
def test_what_a_holder_polls_and_writes(rclient, keys: Keys, queue: JobQueue) -> None:
    q = queue.space(keys)
    item_id = new(rclient, keys, queue)
    claim(rclient, keys, queue, "h1")
    assert run(rclient, queue.watch(keys, item_id, "h1")) == (None, True)
    assert run(rclient, queue.watch(keys, item_id, "h2")) == (None, False)  # not this holder's
    queue.set_fields(rclient, keys, item_id, {"progress_at": 1.5, "step": 3, "note": ""})
    assert rclient.hmget(q.record(item_id), "progress_at", "step", "note") == [b"1.5", b"3", b""]
    assert run(rclient, queue.field(keys, item_id, "step")) == "3"
    assert run(rclient, queue.field(keys, item_id, "nope")) is None
    assert run(rclient, queue.field(keys, "missing", "state")) is None

    queue.hand_back(rclient, keys, item_id)
    assert run(rclient, queue.watch(keys, item_id, "h1")) == (REQUEUE, True)
    rclient.delete(q.cancel(item_id))
    assert call(rclient, queue.cancel(keys, item_id)) == b"cancelling"
    queue.hand_back(rclient, keys, item_id)  # an asked cancel stays a cancel
    assert run(rclient, queue.watch(keys, item_id, "h1")) == (CANCEL, True)

    # taken from the holder (reaped): it only drops the id from its claimed list
    rclient.hset(q.record(item_id), mapping={"state": "queued", queue.holder: ""})
    assert run(rclient, queue.watch(keys, item_id, "h1"))[1] is False
    queue.release(rclient, keys, item_id, "h1")
    assert rclient.llen(q.claimed("h1")) == 0 and record(rclient, keys, queue, item_id)["state"] == "queued"


def test_deleted_ids_are_kept_for_a_while(rclient, keys: Keys) -> None:
    job = new(rclient, keys, TRAINING)
    assert call(rclient, TRAINING.delete(keys, job)) == b"deleted"
    rclient.zadd(keys.training.deleted(), {"job-000000000000": time.time() - 100})
    assert sorted(TRAINING.deleted_ids(rclient, keys, 1000)) == sorted([job, "job-000000000000"])
    assert TRAINING.deleted_ids(rclient, keys, 50) == [job]  # the old one is dropped from the list
    assert rclient.zcard(keys.training.deleted()) == 1


def test_published_evaluation_tasks(rclient, keys: Keys, redis_url: str) -> None:
    names = [f"task_{i}" for i in range(eval_tasks.CHUNK + 5)]  # more than one SADD
    eval_tasks.publish(rclient, keys, names)
    eval_tasks.publish(rclient, keys, ["other"])  # a second evaluator: the union
    assert rclient.scard(keys.eval_tasks()) == len(names) + 1
    rclient.delete(keys.eval_tasks())
    eval_tasks.publish_if_lost(rclient, keys, ["other"])
    eval_tasks.publish_if_lost(rclient, keys, ["not again"])  # present: left as it is
    assert run(rclient, eval_tasks.every(keys)) == {"other"}

    async def gateway() -> tuple[list[bool], set[str]]:  # the gateway drives the same plans with asyncio
        async with aredis.Redis.from_url(redis_url) as client:
            known = await arun(client, eval_tasks.known(keys, ["x", "other"]))
            return known, await arun(client, eval_tasks.every(keys))

    assert asyncio.run(gateway()) == ([False, True], {"other"})


def test_records_and_logs_decode_in_one_shape() -> None:
    job = TRAINING.decode({b"id": b"job-1", b"loss": b"nan", b"step": b"3", b"eta_seconds": b"", b"spec": b"{}"})
    assert job == {"id": "job-1", "loss": None, "step": 3, "eta_seconds": None, "spec": {}, "checkpoints": []}
    ev = EVALUATIONS.decode({"results": '{"t": {}}', "done_requests": "5", "started": "1.5"})
    assert ev == {"results": {"t": {}}, "done_requests": 5, "started": 1.5}
    rec = decode_log(b"1-0", {k.encode(): v.encode() for k, v in log_fields("hi", "warning", step=2).items()})
    assert (rec["id"], rec["level"], rec["msg"], rec["data"]) == ("1-0", "warning", "hi", {"step": 2})


class _Echo(QueueConsumer):
    """A consumer whose work is to succeed, or to raise when the spec says so."""

    queue = EVALUATIONS

    def work(self, item_id: str, spec_json: bytes) -> None:
        if orjson.loads(spec_json).get("x") == 2:
            raise RuntimeError("asked to fail")
        self._log(item_id, "working")
        self._end(item_id, "succeeded", "echoed", fields={"results": {"ok": True}})


def test_a_consumer_takes_runs_and_fails_records(rclient, keys: Keys, redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, key_prefix=keys.prefix, evaluator_heartbeat_s=3)
    good = new(rclient, keys, EVALUATIONS)
    bad = new(rclient, keys, EVALUATIONS)
    rclient.hset(keys.evaluations.record(bad), "spec", '{"x": 2}')
    consumer = _Echo(rclient, keys, settings, name="echo", block_s=0.2)
    assert consumer.consume(max_count=2) == 2
    assert record(rclient, keys, EVALUATIONS, good)["results"] == {"ok": True}
    assert messages(rclient, keys, EVALUATIONS, good)[-2:] == ["working", "echoed"]
    rec = record(rclient, keys, EVALUATIONS, bad)
    assert (rec["state"], rec["error"]) == ("failed", "RuntimeError: asked to fail")
    # stopped: its heartbeat and its entry among the evaluators are gone
    assert not rclient.exists(keys.evaluations.holder("echo"))
    assert rclient.zscore(keys.evaluations.holders(), "echo") is None
    assert rclient.llen(keys.evaluations.claimed("echo")) == 0
