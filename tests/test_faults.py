"""Faults with real processes: a worker SIGKILLed mid-batch, a worker SIGTERMed, Redis crashing with AOF."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from grape.keys import GROUP, Keys
from grape.redis_client import connect
from grape.redis_server import EmbeddedRedis
from grape.settings import Settings
from grape.store.codec import decode_scores
from service.app import create_app
from tests.conftest import MODEL, ROOT, create, load_pool, wait_done
from workers.loop import Worker


def spawn_worker(
    redis_url: str, keys: Keys, tmp_path: Path, name: str, *args: str, defaults: bool = False, **env: str
) -> subprocess.Popen:
    """A real `python -m workers` process in a session of its own (SIGKILL to the group takes its engine
    processes too, as an OOM kill or a power loss would). `defaults`: no GRAPE_* setting but the Redis
    and key prefix; otherwise a short block time and the hf backend (fast to start) unless `args` say."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPE_")}
    full_env |= {"REDIS_URL": redis_url, "GRAPE_KEY_PREFIX": keys.prefix, **env}
    if not defaults:
        full_env.setdefault("GRAPE_BLOCK_MS", "200")
        args = args if "--backend" in args else ("--backend", "hf", *args)
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process by the OS
    return subprocess.Popen(
        [sys.executable, "-m", "workers", "--model", MODEL, "--name", name, *args],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker and every process it started (vLLM's engine core)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: worker exited {proc.returncode}\n{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def assert_every_candidate_scored_once(api, rclient, keys, ds, items) -> None:
    st = api.get(f"/v1/datasets/{ds}").json()
    n_cands = sum(len(i["candidates"]) for i in items)
    assert (st["items"], st["candidates"], st["scored_items"], st["scored_candidates"]) == (
        len(items),
        n_cands,
        len(items),
        n_cands,
    ), st
    assert st["failed_items"] == 0
    stored = rclient.hgetall(keys.scores(ds))
    assert sorted(k.decode() for k in stored) == sorted(i["id"] for i in items)
    for item in items:
        scores = decode_scores(stored[item["id"].encode()])
        assert len(scores) == len(item["candidates"])
        assert all(s["tokens"] > 0 and s["logprob_sum"] < 0 for s in scores)
    # the token counter matches what the stored scores add up to: nothing was counted twice
    total = sum(s["tokens"] + s["prompt_tokens"] for v in stored.values() for s in decode_scores(v))
    assert st["tokens_scored"] == total
    assert rclient.xpending(keys.stream(MODEL), GROUP)["pending"] == 0


def test_sigkilled_worker_mid_batch_is_taken_over(api, rclient, keys, redis_url, tmp_path) -> None:
    items = load_pool(6, start=60, max_chars=250, candidates=3)
    ds = create(api)
    assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 6
    a = spawn_worker(redis_url, keys, tmp_path, "victim", GRAPE_COMMIT_TOKENS="256")
    try:
        scored = lambda: api.get(f"/v1/datasets/{ds}").json()["scored_items"]  # noqa: E731
        wait_for(lambda: scored() >= 2, 300, "victim scores some items", a, tmp_path / "victim.log")
        assert scored() < 6, "the victim finished before it could be killed; the test proves nothing"
        pending = rclient.xpending(keys.stream(MODEL), GROUP)
        assert pending["pending"] >= 1 and {c["name"] for c in pending["consumers"]} == {b"victim"}
        kill_group(a)
    finally:
        kill_group(a)
    b = spawn_worker(redis_url, keys, tmp_path, "rescuer", GRAPE_CLAIM_IDLE_MS="1000")
    try:
        wait_for(
            lambda: api.get(f"/v1/datasets/{ds}").json()["state"] == "done",
            300,
            "rescuer finishes the dataset",
            b,
            tmp_path / "rescuer.log",
        )
    finally:
        b.terminate()
        b.wait(timeout=60)
        kill_group(b)
    assert_every_candidate_scored_once(api, rclient, keys, ds, items)


def _holder(rclient, keys) -> str | None:
    """The one consumer holding entries of the model's stream, if exactly one does."""
    try:
        pending = rclient.xpending(keys.stream(MODEL), GROUP)
    except redis.ResponseError:  # no group yet: the worker has not started consuming
        return None
    names = {c["name"].decode() for c in pending["consumers"]}
    return names.pop() if len(names) == 1 else None


def test_with_default_settings_a_dead_workers_chunk_is_taken_over_within_a_minute(
    redis_url, rclient, keys, tmp_path
) -> None:
    """Two `python -m workers` with default settings (no GRAPE_CLAIM_IDLE_MS, the default backend), both
    ready and idle; a 12-item dataset in one chunk; whichever worker took it is SIGKILLed mid-batch, after
    it wrote part of the chunk. The other takes the chunk over within 60 s and finishes the dataset, every
    candidate scored once."""
    items = load_pool(12, start=200, max_chars=300, candidates=4)
    names = ["left", "right"]
    # small slices (GRAPE_COMMIT_TOKENS) only so that the victim has written part of its chunk when killed
    procs = {n: spawn_worker(redis_url, keys, tmp_path, n, defaults=True, GRAPE_COMMIT_TOKENS="256") for n in names}
    settings = Settings(redis_url=redis_url, key_prefix=keys.prefix, chunk_pairs=256)
    try:
        with TestClient(create_app(settings)) as api:
            for n, p in procs.items():  # both loaded and consuming: their heartbeats are up
                wait_for(lambda n=n: rclient.exists(keys.worker(n)), 600, f"{n} starts", p, tmp_path / f"{n}.log")
            ds = create(api)
            assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 12
            assert rclient.xlen(keys.stream(MODEL)) == 1  # the only chunk
            wait_for(lambda: _holder(rclient, keys) is not None, 60, "a worker takes the chunk")
            victim = _holder(rclient, keys)
            rescuer = next(n for n in names if n != victim)
            scored = lambda: api.get(f"/v1/datasets/{ds}").json()["scored_items"]  # noqa: E731
            wait_for(lambda: scored() >= 2, 300, "the victim writes part of its chunk", procs[victim])
            assert scored() < 12, "the victim finished before it could be killed; the test proves nothing"
            kill_group(procs[victim])
            killed = time.monotonic()
            # the entry moves to the live worker (or is already done) within a minute of the kill
            wait_for(
                lambda: _holder(rclient, keys) == rescuer or rclient.xlen(keys.stream(MODEL)) == 0,
                60,
                "the live worker takes the dead one's chunk over within 60 s",
                procs[rescuer],
                tmp_path / f"{rescuer}.log",
            )
            took_over = time.monotonic() - killed
            st = wait_done(api, ds, timeout=600)
            assert_every_candidate_scored_once(api, rclient, keys, ds, items)
            assert st["state"] == "done" and took_over < 60
            assert rclient.xpending(keys.stream(MODEL), GROUP)["pending"] == 0
            assert "taking over" in (tmp_path / f"{rescuer}.log").read_text()
    finally:
        for p in procs.values():
            kill_group(p)


class SlowOnce:
    """A backend whose first call takes `seconds` longer: a slow batch on a live worker."""

    def __init__(self, backend, seconds: float) -> None:
        self._backend, self._seconds, self.calls = backend, seconds, 0

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def score(self, requests):
        self.calls += 1
        if self.calls == 1:
            time.sleep(self._seconds)
        return self._backend.score(requests)


def test_a_slow_batch_on_a_live_worker_is_not_taken_with_default_settings(
    api, rclient, keys, hf_backend, worker_factory
) -> None:
    from grape.settings import DEFAULT_CLAIM_IDLE_MS

    items = load_pool(2, start=210, max_chars=150, candidates=2)
    ds = create(api)
    api.post(f"/v1/datasets/{ds}/items", json={"items": items})
    slow = worker_factory(backend=SlowOnce(hf_backend, DEFAULT_CLAIM_IDLE_MS / 1000 + 8), name="slow")
    wait_for(lambda: _holder(rclient, keys) == "slow", 60, "the slow worker takes the chunk")
    other = worker_factory(name="other")  # default claim idle; polls every 200 ms meanwhile
    assert other.claim_idle_ms == DEFAULT_CLAIM_IDLE_MS
    seen = set()
    deadline = time.monotonic() + 300
    while api.get(f"/v1/datasets/{ds}").json()["state"] != "done":
        pending = rclient.xpending_range(keys.stream(MODEL), GROUP, min="-", max="+", count=10)
        seen |= {(p["consumer"].decode(), p["times_delivered"]) for p in pending}
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert seen == {("slow", 1)}, seen  # never delivered to the other worker, never delivered again
    assert (slow.stats.items, other.stats.items) == (2, 0)
    assert_every_candidate_scored_once(api, rclient, keys, ds, items)


def test_sigterm_finishes_or_hands_back_and_exits(api, rclient, keys, redis_url, tmp_path) -> None:
    items = load_pool(6, start=70, max_chars=250, candidates=3)
    ds = create(api)
    api.post(f"/v1/datasets/{ds}/items", json={"items": items})
    w = spawn_worker(redis_url, keys, tmp_path, "terminated", GRAPE_COMMIT_TOKENS="256")
    try:
        wait_for(
            lambda: api.get(f"/v1/datasets/{ds}").json()["scored_items"] >= 1,
            300,
            "worker starts scoring",
            w,
            tmp_path / "terminated.log",
        )
        w.send_signal(signal.SIGTERM)
        assert w.wait(timeout=120) == 0
    finally:
        kill_group(w)
    # nothing is left pending on the stopped worker: all it took is either scored or queued again
    assert rclient.xpending(keys.stream(MODEL), GROUP)["pending"] == 0
    st = api.get(f"/v1/datasets/{ds}").json()
    queued = [orjson.loads(f[b"items"]) for _, f in rclient.xrange(keys.stream(MODEL))]
    assert st["scored_items"] + sum(len(q) for q in queued) == 6
    log = (tmp_path / "terminated.log").read_text()
    assert "stopping after the current batch" in log


def test_accepted_items_survive_a_redis_crash_with_aof(tmp_path, hf_backend) -> None:
    conf = ROOT / "deploy" / "redis.conf"
    server = EmbeddedRedis(tmp_path / "redis", config_file=conf).start()
    try:
        keys = Keys("grape-aof")
        settings = Settings(redis_url=server.url, key_prefix=keys.prefix, chunk_pairs=4)
        items = load_pool(3, start=80, max_chars=200, candidates=2)
        with TestClient(create_app(settings)) as api:
            ds = create(api)
            assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 3
            assert redis.Redis(port=server.port).config_get("appendonly")["appendonly"] == "yes"
            time.sleep(1.5)  # appendfsync everysec: what was answered a second ago is on disk
            server.stop(kill=True)  # SIGKILL: no shutdown save
            server.start()
            st = api.get(f"/v1/datasets/{ds}").json()
            assert (st["items"], st["candidates"], st["state"]) == (3, 6, "scoring")
            client = connect(server.url)
            worker = Worker(client, keys, MODEL, hf_backend, block_ms=200)
            t = threading.Thread(target=worker.run, daemon=True)
            t.start()
            try:
                st = wait_done(api, ds, timeout=300)
            finally:
                worker.stop()
                t.join(timeout=60)
            assert (st["scored_items"], st["scored_candidates"], st["failed_items"]) == (3, 6, 0)
    finally:
        server.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"])
def test_gateway_refuses_to_listen_on_the_network_without_keys(host) -> None:
    with pytest.raises(ValueError, match="GRAPE_API_KEYS"):
        Settings(host=host).check_exposure()
    Settings(host=host, api_keys="k1").check_exposure()
    Settings(host="127.0.0.1").check_exposure()
