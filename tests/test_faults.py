"""Faults with real processes: a worker SIGKILLed mid-batch, a worker SIGTERMed, Redis crashing with AOF."""

from __future__ import annotations

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
from service.app import create_app
from tests.conftest import MODEL, ROOT, create, load_pool, wait_done
from workers.loop import Worker


def spawn_worker(redis_url: str, keys: Keys, tmp_path: Path, name: str, **env: str) -> subprocess.Popen:
    full_env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "GRAPE_KEY_PREFIX": keys.prefix,
        "GRAPE_BLOCK_MS": "200",
        **env,
    }
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process by the OS
    return subprocess.Popen(
        [sys.executable, "-m", "workers", "--model", MODEL, "--name", name],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


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
        scores = orjson.loads(stored[item["id"].encode()])
        assert len(scores) == len(item["candidates"])
        assert all(s["tokens"] > 0 and s["logprob_sum"] < 0 for s in scores)
    # the token counter matches what the stored scores add up to: nothing was counted twice
    total = sum(s["tokens"] + s["prompt_tokens"] for v in stored.values() for s in orjson.loads(v))
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
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
    finally:
        a.kill()
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
        w.kill()
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
