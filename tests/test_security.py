"""The gateway edge of the security model (docs/operator/security.md), tried as an outside reviewer would:
a gateway with GRAPE_API_KEYS set and every request carrying a valid key, so each refusal below is the
gateway's own rule and not the 401 of a missing key. Real Redis; the real gateway process (uvicorn)
where the limit lives in the server, the in-process app elsewhere; the real model where items are scored.

The training half (the second part of this file): an API key lets you train, nothing more. Every training
row of the issue's table is sent to the real gateway app and refused, and nothing happens: no remote code
runs, no file outside the job's own directory is read or written, no setting of the operator is
overridden. Real Redis, the real model, real trainers (in threads, in `python -m trainer.sft` processes,
and a `grape trainer` SIGKILLed).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from grape.chat_templates import BUILTIN, UnknownTemplate, load_template
from grape.client import GrapeClient
from grape.jobs import OPTIMIZERS, SCHEDULERS, Hyperparameters, JobSpec, LoraSpec
from grape.keys import Keys, model_key
from grape.settings import Settings
from grape.store import heartbeats
from grape.store.io import call
from grape.store.scoring import ItemResult, results
from service.app import create_app
from tests.conftest import MODEL, load_pool, ndjson, start_gateway
from tests.test_training import HP, LORA, _claim_as, scored_dataset, wait_job
from trainer.loop import JobError, TrainerLoop
from workers.loop import Worker

KEY = "security-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ANSWER_BOUND = 64 * 1024  # bytes: every refusal below must be at most this long
ITEM = {"instruction": "Say hi.", "candidates": [{"source": "a", "response": "Hi!"}]}


# fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture
def secure(redis_url: str, keys: Keys) -> Iterator[TestClient]:
    """The app in process, with API keys; every request carries a valid one."""
    s = Settings(redis_url=redis_url, key_prefix=keys.prefix, api_keys=KEY, chunk_pairs=16)
    with TestClient(create_app(s), headers=AUTH, raise_server_exceptions=False) as client:
        yield client


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def gateway(redis_url: str, keys: Keys) -> Iterator[tuple[httpx.Client, subprocess.Popen]]:
    """The real gateway process (uvicorn), with API keys; a client that sends a valid key."""
    proc, url = start_gateway(redis_url, keys, GRAPE_API_KEYS=KEY, GRAPE_HEADER_TIMEOUT_S="2")
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client, proc
    _stop(proc)


@pytest.fixture(scope="module")
def scored(redis_url: str, hf_backend: Any) -> Iterator[tuple[str, Keys, str]]:
    """A keyed gateway process with one dataset scored by the real model: (url, keys, dataset id)."""
    keys = Keys(f"grape-test-{uuid.uuid4().hex[:8]}")
    rclient = redis.Redis.from_url(redis_url)
    proc, url = start_gateway(redis_url, keys, GRAPE_API_KEYS=KEY, GRAPE_MAX_LOG_FOLLOWERS="2")
    worker = Worker(rclient, keys, MODEL, hf_backend, block_ms=200)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            ds = c.post("/v1/datasets", json={"name": "victim", "target_model": MODEL}).json()["id"]
            body = ndjson(load_pool(3, max_chars=120, candidates=3))
            r = c.post(f"/v1/datasets/{ds}/items", content=body, headers={"Content-Type": "application/x-ndjson"})
            assert r.status_code == 202, r.text
            deadline = time.monotonic() + 300
            while c.get(f"/v1/datasets/{ds}").json()["state"] != "done":
                assert time.monotonic() < deadline, "the worker did not score the dataset"
                time.sleep(0.2)
        yield url, keys, ds
    finally:
        worker.stop()
        thread.join(timeout=120)
        _stop(proc)
        stale = list(rclient.scan_iter(match=f"{keys.prefix}:*", count=1000))
        if stale:
            rclient.delete(*stale)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


class HealthProbe:
    """/healthz, asked every 50 ms from another thread, with its slowest answer time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                t = time.monotonic()
                assert c.get(f"{self.url}/healthz").status_code == 200
                self.times.append(time.monotonic() - t)
                time.sleep(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


# ids are ids -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [":items", ":scores", ":stats", ":order", ":failed", ":rating", "/../x"])
def test_an_id_with_a_key_suffix_names_nothing_and_the_other_dataset_is_untouched(scored, rclient, suffix) -> None:
    url, keys, ds = scored
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        before_sel = c.get(f"/v1/datasets/{ds}/selection").text
        before_items = rclient.hgetall(keys.items(ds))
        assert before_sel.count("\n") == 3 and len(before_items) == 3
        bad = quote(ds + suffix, safe="")
        r = c.delete(f"/v1/datasets/{bad}")
        assert r.status_code == 404, r.text
        assert "/" in suffix or "ds-<12 hex digits>" in r.json()["detail"]
        for path in ("", "/items/x", "/selection", "/summary", "/failures", "/compare?strategies=grape"):
            r = c.get(f"/v1/datasets/{bad}{path}")
            assert r.status_code == 404, (path, r.status_code, r.text)
        r = c.post(f"/v1/datasets/{bad}/scores", json={"scores": ["length"]})
        assert r.status_code == 404
        r = c.post("/v1/training-jobs", json={"dataset_id": ds + suffix})
        assert r.status_code in (404, 422), r.text
        # the dataset the suffix pointed at is exactly as it was
        st = c.get(f"/v1/datasets/{ds}").json()
        assert st["state"] == "done" and st["scored_items"] == 3
        assert c.get(f"/v1/datasets/{ds}/selection").text == before_sel
        assert rclient.hgetall(keys.items(ds)) == before_items


def test_job_ids_are_checked_at_the_edge(scored) -> None:
    url, _, _ = scored
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        for bad in ("job-0123456789ab:log", "job-0123456789ab:cancel", "x", "job-0123456789abc"):
            for method, path in (("GET", ""), ("GET", "/logs"), ("POST", "/cancel"), ("POST", "/resume")):
                r = c.request(method, f"/v1/training-jobs/{quote(bad, safe='')}{path}")
                assert r.status_code == 404, (bad, path, r.text)
        assert c.get("/v1/training-jobs").status_code == 200


ODD_IDS = ["a/b", "../up", "//lead/", "q?x#y%z&w=1", "sp ace", "ü/ñ/漢字", "%2F", "%", ".", "..", "tab\there", "\\"]


def test_item_ids_with_any_characters_can_be_fetched(gateway) -> None:
    """On the real server (the in-process TestClient decodes a path twice, so `%252F` would not survive it)."""
    c, _ = gateway
    client = GrapeClient(str(c.base_url), api_key=KEY)
    ds = client.create_dataset("ids", MODEL)["id"]
    assert client.upload(ds, [{**ITEM, "id": i} for i in ODD_IDS])["accepted"] == len(ODD_IDS)
    assert [client.item(ds, i)["id"] for i in ODD_IDS] == ODD_IDS  # the bundled client percent-encodes
    for item_id in ODD_IDS:
        got = c.get(f"/v1/datasets/{ds}/items/{quote(item_id, safe='').replace('.', '%2E')}")
        assert got.status_code == 200 and got.json()["id"] == item_id, (item_id, got.text)
    assert c.get(f"/v1/datasets/{ds}/items/a/b").json()["id"] == "a/b"  # a raw `/` works too
    assert c.get(f"/v1/datasets/{ds}/items/a%2Fc").status_code == 404


def test_model_names_map_to_queues_one_to_one(redis_url, keys, rclient) -> None:
    assert keys.stream("org/model:v1") != keys.stream("org/model_v1")
    assert keys.stream("smollm2-135m") == f"{keys.prefix}:q:smollm2-135m"  # safe names keep their keys
    names = ["org/model:v1", "org/model_v1", "org/model%3Av1", "a b", "a_b", "a%20b", "ü", "%C3%BC", "m", " m "]
    assert len({model_key(n) for n in names}) == len(names) - 1  # only "m" and " m " are one name
    assert all(":" not in model_key(n) for n in names)  # the separator of `q:{task}:{model}`
    s = Settings(redis_url=redis_url, key_prefix=keys.prefix, api_keys=KEY, allowed_models="org/model:v1,org/model_v1")
    with TestClient(create_app(s), headers=AUTH) as api:
        for model in ("org/model:v1", "org/model_v1"):
            r = api.post("/v1/datasets", json={"name": "q", "target_model": model})
            assert r.status_code == 201, r.text
            assert api.post(f"/v1/datasets/{r.json()['id']}/items", json={"items": [ITEM]}).status_code == 202
    assert rclient.xlen(keys.stream("org/model:v1")) == 1
    assert rclient.xlen(keys.stream("org/model_v1")) == 1


# every answer and stored value bounded -------------------------------------------------------------------
def test_a_body_of_bad_ndjson_lines_gets_a_small_422(gateway) -> None:
    c, proc = gateway
    ds = c.post("/v1/datasets", json={"name": "x", "target_model": MODEL}).json()["id"]
    peak = rss_mb(proc.pid, "VmHWM")
    for size in (2**20, 8 * 2**20 - 1):  # the 1 MiB, and just under the upload limit
        t = time.monotonic()
        r = c.post(
            f"/v1/datasets/{ds}/items", content=b"x\n" * (size // 2), headers={"Content-Type": "application/x-ndjson"}
        )
        assert r.status_code == 422, r.text[:500]
        assert len(r.content) < ANSWER_BOUND, len(r.content)
        body = r.json()
        assert len(body["rejected"]) <= 100 and body["rejected_total"] > 100
        assert time.monotonic() - t < 10
    assert rss_mb(proc.pid, "VmHWM") - peak < 200  # was 0.7 GB for the 1 MiB body
    assert c.get(f"/v1/datasets/{ds}").json()["items"] == 0


def test_validation_errors_are_capped_and_never_echo_the_input(secure) -> None:
    body = {"name": "n", "target_model": MODEL, "scores": list(range(100_000))}  # 100k invalid entries, ~0.6 MB
    r = secure.post("/v1/datasets", content=orjson.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert len(r.content) < ANSWER_BOUND
    assert r.json()["errors_total"] >= 100_000 and len(r.json()["detail"]) <= 100
    secret = "S3CRET-" + "y" * 5000
    r = secure.post("/v1/datasets", json={"name": secret, "target_model": MODEL})
    assert r.status_code == 422 and "S3CRET" not in r.text


def test_every_route_has_a_body_limit_chunked_or_not(gateway, rclient, keys) -> None:
    c, _ = gateway
    ds = c.post("/v1/datasets", json={"name": "x", "target_model": MODEL}).json()["id"]
    junk = orjson.dumps({"dataset_id": ds, "junk": "j" * (30 * 2**20)})

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(junk), 2**16):
            yield junk[i : i + 2**16]

    for content in (junk, chunks()):  # with Content-Length, and chunked (no length)
        r = c.post("/v1/training-jobs", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text[:300]
        assert "GRAPE_MAX_REQUEST_BYTES" in r.json()["detail"]
    big_upload = ndjson([{**ITEM, "id": f"i{n}", "instruction": "q" * 10_000} for n in range(900)])  # > 8 MiB
    r = c.post(
        f"/v1/datasets/{ds}/items",
        content=(big_upload[i : i + 2**16] for i in range(0, len(big_upload), 2**16)),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 413 and "GRAPE_MAX_BODY_BYTES" in r.json()["detail"]
    # nothing was stored: no job, no item, nothing new under the prefix but the dataset itself
    assert c.get("/v1/training-jobs").json()["jobs"] == []
    assert rclient.zcard(keys.training.ids()) == 0
    assert c.get(f"/v1/datasets/{ds}").json()["items"] == 0
    stored = sum(rclient.memory_usage(k) or 0 for k in rclient.scan_iter(match=f"{keys.prefix}:*"))
    assert stored < 2**20


@pytest.mark.parametrize(
    "bad", [b'"\\ud800"', b'"x\\udfff"', b"NaN", b"Infinity", b"-1e400", b'"\xff"'], ids=lambda b: b.decode("latin-1")
)
def test_lone_surrogates_and_non_finite_numbers_are_4xx_not_500(secure, bad) -> None:
    ds = secure.post("/v1/datasets", json={"name": "x", "target_model": MODEL}).json()["id"]
    bodies = {
        "/v1/datasets": b'{"name": %s, "target_model": "smollm2-135m"}',
        f"/v1/datasets/{ds}/scores": b'{"scores": ["rating"], "scorer_model": %s}',
        "/v1/training-jobs": b'{"dataset_id": "%s", "tau": %%s}' % ds.encode(),
    }
    for path, template in bodies.items():
        r = secure.post(path, content=template % bad, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (path, r.status_code, r.text)
        assert len(r.content) < ANSWER_BOUND
    line = b'{"id": "1", "instruction": %s, "candidates": [{"response": "r"}]}' % bad
    for ctype in ("application/x-ndjson", "application/json"):
        content = line if ctype != "application/json" else b'{"items": [%s]}' % line
        r = secure.post(f"/v1/datasets/{ds}/items", content=content, headers={"Content-Type": ctype})
        assert 400 <= r.status_code < 500, r.text
    assert secure.get(f"/v1/datasets/{ds}").json()["items"] == 0
    assert secure.get(f"/v1/datasets/{ds}/items/%ED%A0%80").status_code == 404  # a surrogate's UTF-8 in a path


def test_compare_is_bounded_and_runs_off_the_event_loop(gateway, rclient, keys) -> None:
    """A wide pool (64 sources per item), scored by writing scores straight into Redis: this is about the
    gateway's event loop, not about scoring."""
    c, _ = gateway
    ds = c.post("/v1/datasets", json={"name": "wide", "target_model": MODEL}).json()["id"]
    sources = [f"s{i}" for i in range(64)]
    items = [
        {"id": f"i{n}", "instruction": f"q{n}", "candidates": [{"source": s, "response": f"r{n}{s}"} for s in sources]}
        for n in range(9000)  # enough that even the column forms (grape.strategies.columns) take over a second
    ]
    for start in range(0, len(items), 1000):
        body = ndjson(items[start : start + 1000])
        r = c.post(f"/v1/datasets/{ds}/items", content=body, headers={"Content-Type": "application/x-ndjson"})
        assert r.json()["accepted"] == 1000
    scores = [{"logprob_sum": -1.0 - j, "tokens": 3 + j % 5, "prompt_tokens": 9} for j in range(64)]
    rclient.hset(keys.scores(ds), mapping={it["id"]: orjson.dumps(scores) for it in items})

    t = time.monotonic()
    many = ",".join(f"source:x{i}" for i in range(601))
    r = c.get(f"/v1/datasets/{ds}/compare", params={"strategies": many})
    assert r.status_code == 422 and "GRAPE_MAX_COMPARE_STRATEGIES" in r.json()["detail"]
    assert time.monotonic() - t < 1

    at_limit = ",".join(["grape", "longest", "random", *(f"source:{s}" for s in sources[:29])])
    with HealthProbe(str(c.base_url)) as probe:
        t = time.monotonic()
        r = c.get(f"/v1/datasets/{ds}/compare", params={"strategies": at_limit, "n": 1000})
        took = time.monotonic() - t
        c.get(f"/v1/datasets/{ds}/summary")
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["strategies"]) == 32 and len(r.content) < ANSWER_BOUND
    assert took > 1, f"compare took {took:.2f} s: too little work for the measurement to mean anything"
    assert len(probe.times) >= 5 and max(probe.times) < 1, (took, max(probe.times))


def test_compare_and_summary_list_a_bounded_number_of_sources(secure, rclient, keys) -> None:
    ds = secure.post("/v1/datasets", json={"name": "many sources", "target_model": MODEL}).json()["id"]
    items = [
        {"id": f"i{n}", "instruction": "q", "candidates": [{"source": f"src{n}", "response": "r"}]} for n in range(300)
    ]
    assert secure.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 300
    one = [{"logprob_sum": -1.0, "tokens": 1, "prompt_tokens": 3}]
    # through the workers' results script: the kept summary reads what the scored counters announce
    call(rclient, results(keys, "logprob", MODEL, ds, "", time.time(), [ItemResult(it["id"], 1, one) for it in items]))
    body = secure.get(f"/v1/datasets/{ds}/compare", params={"strategies": "grape,longest"}).json()
    assert len(body["sources"]) == 100 and body["sources_total"] == 300
    assert all(len(s["sources"]) == 100 for s in body["strategies"])
    summary = secure.get(f"/v1/datasets/{ds}/summary").json()
    assert len(summary["sources"]) == 100 and summary["sources_total"] == 300


def _half_sent_header(port: int, size: int) -> tuple[bool, float]:
    """Send a request head whose one header is `size` bytes and never end it; (refused, seconds)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    t = time.monotonic()
    head = f"GET /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\nX-Pad: ".encode()
    refused = False
    try:
        sock.sendall(head + b"a" * size)
        answer = sock.recv(65536)
        refused = answer == b"" or answer.startswith(b"HTTP/1.1 431")
    except OSError:  # reset while sending: the server closed the connection before reading it all
        refused = True
    finally:
        took = time.monotonic() - t
        sock.close()
    return refused, took


def test_a_huge_request_header_is_refused_without_being_read(gateway) -> None:
    c, proc = gateway
    port = c.base_url.port
    assert port is not None
    c.get("/v1/datasets")
    before = rss_mb(proc.pid)
    results: list[tuple[bool, float]] = []
    threads = [threading.Thread(target=lambda: results.append(_half_sent_header(port, 8 * 2**20))) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    grew = rss_mb(proc.pid) - before
    assert len(results) == 20 and all(refused for refused, _ in results), results
    assert max(took for _, took in results) < 10
    assert grew < 50, f"the gateway grew {grew:.0f} MB"
    assert c.get("/healthz").status_code == 200


def test_a_connection_that_never_finishes_its_head_is_closed(gateway) -> None:
    c, _ = gateway
    sock = socket.create_connection(("127.0.0.1", c.base_url.port), timeout=10)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ... and nothing more
        t = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the gateway (GRAPE_HEADER_TIMEOUT_S=2 here)
        assert time.monotonic() - t < 8
    finally:
        sock.close()


def test_log_follow_streams_are_limited_per_key(scored) -> None:
    url, _, ds = scored
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        r = c.post("/v1/training-jobs", json={"dataset_id": ds})  # queued: no trainer runs in this test
        assert r.status_code == 201, r.text
        job = r.json()["id"]
        path = f"/v1/training-jobs/{job}/logs?follow=true"
        with c.stream("GET", path) as first, c.stream("GET", path) as second:
            assert first.status_code == second.status_code == 200
            third = c.get(path)
            assert third.status_code == 429 and "GRAPE_MAX_LOG_FOLLOWERS" in third.json()["detail"]
            assert third.headers["Retry-After"]
            assert c.get(f"/v1/training-jobs/{job}/logs").status_code == 200  # reading without follow is not limited
        deadline = time.monotonic() + 10  # the two streams were closed: their slots come back
        while True:
            with c.stream("GET", path) as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "closed follow streams kept their slots"
            time.sleep(0.2)
        assert c.post(f"/v1/training-jobs/{job}/cancel").status_code == 202


def test_uploads_being_read_at_once_are_limited(redis_url, keys) -> None:
    proc, url = start_gateway(redis_url, keys, GRAPE_API_KEYS=KEY, GRAPE_MAX_CONCURRENT_UPLOADS="1")
    release = threading.Event()
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            ds = c.post("/v1/datasets", json={"name": "slow", "target_model": MODEL}).json()["id"]
            ndjson_type = {"Content-Type": "application/x-ndjson"}

            def slow_body() -> Iterator[bytes]:  # an upload that is still arriving
                yield orjson.dumps({**ITEM, "id": "slow"}) + b"\n"
                release.wait(30)

            first: list[httpx.Response] = []

            def start_slow() -> threading.Thread:
                first.clear()
                t = threading.Thread(
                    target=lambda: first.append(
                        c.post(f"/v1/datasets/{ds}/items", content=slow_body(), headers=ndjson_type)
                    )
                )
                t.start()
                return t

            t = start_slow()
            deadline = time.monotonic() + 30
            for n in itertools.count():  # the slow upload holds the only slot once the gateway reads it
                if not t.is_alive():  # it came while a probe held the slot (a 429 of its own): send it again
                    assert first[0].status_code == 429
                    t = start_slow()
                    time.sleep(0.2)
                r = c.post(f"/v1/datasets/{ds}/items", content=ndjson([{**ITEM, "id": f"f{n}"}]), headers=ndjson_type)
                if r.status_code == 429 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert r.status_code == 429 and "GRAPE_MAX_CONCURRENT_UPLOADS" in r.json()["detail"]
            assert r.headers["Retry-After"]
            release.set()
            t.join(timeout=30)
            assert first[0].json()["accepted"] == 1
            r = c.post(f"/v1/datasets/{ds}/items", content=ndjson([{**ITEM, "id": "after"}]), headers=ndjson_type)
            assert r.status_code == 202 and r.json()["accepted"] == 1  # the slot came back
    finally:
        release.set()
        _stop(proc)


def test_the_redis_pool_is_bounded(secure) -> None:
    pool = secure.app.state.redis.connection_pool  # type: ignore[attr-defined]
    assert type(pool).__name__ == "BlockingConnectionPool"
    assert pool.max_connections == Settings().redis_max_connections
    threads = secure.app.state.redis_threads.connection_pool  # type: ignore[attr-defined]  # an export's pages
    assert type(threads).__name__ == "BlockingConnectionPool"
    assert threads.max_connections == Settings().redis_max_connections // 4


# local mode stays local -----------------------------------------------------------------------------------
def test_a_gateway_without_keys_answers_only_local_host_names(redis_url, keys) -> None:
    proc, url = start_gateway(redis_url, keys)
    port = httpx.URL(url).port
    try:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example"):
            r = httpx.get(f"{url}/v1/datasets", headers={"Host": host})
            assert r.status_code == 400 and "GRAPE_ALLOWED_HOSTS" in r.json()["detail"], host
            assert httpx.get(f"{url}/", headers={"Host": host}).status_code == 400
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
            assert httpx.get(f"{url}/v1/datasets", headers={"Host": host}).status_code == 200, host
    finally:
        _stop(proc)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_uploads_need_a_json_or_ndjson_content_type(secure, ctype) -> None:
    ds = secure.post("/v1/datasets", json={"name": "ct", "target_model": MODEL}).json()["id"]
    headers = {"Content-Type": ctype} if ctype else {}
    r = secure.post(f"/v1/datasets/{ds}/items", content=orjson.dumps({"items": [ITEM]}), headers=headers)
    assert r.status_code == 415, r.text
    assert "application/x-ndjson" in r.json()["detail"]
    r = secure.post("/v1/datasets", content=orjson.dumps({"name": "n", "target_model": MODEL}), headers=headers)
    assert r.status_code == 415
    assert secure.get(f"/v1/datasets/{ds}").json()["items"] == 0


# ---- training jobs: what a key holder may ask of a trainer ----

FAKE_DS = "ds-0123456789ab"  # an id of the right form: validation runs before the dataset is looked up
EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


@contextmanager
def app_with(settings: Settings, **update: Any) -> Iterator[TestClient]:
    """The real gateway app with some operator settings changed."""
    with TestClient(create_app(settings.model_copy(update=update))) as client:
        yield client


def remote_code_model(model_path: str, root: Path) -> tuple[Path, Path]:
    """A copy of the real model whose config and tokenizer point, through auto_map, at a .py file that writes a
    marker file when it is imported. Returns (model dir, marker path)."""
    d, marker = root / "remote-code-model", root / "REMOTE_CODE_RAN"
    shutil.copytree(model_path, d)
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["EvilForCausalLM"]
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    return d, marker


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def refused(r: Any, field: str) -> None:
    assert r.status_code == 422, r.text
    assert field in r.text, (field, r.text[:2000])


# ---- the request is an allow-list --------------------------------------------------------------------------


def test_every_operator_setting_in_a_request_is_a_422_naming_it(api, keys, rclient) -> None:
    other = "job-0123456789ab"
    rows: list[tuple[dict[str, Any], str]] = [
        ({"hyperparameters": {"trust_remote_code": True}}, "trust_remote_code"),
        ({"hyperparameters": {"model_init_kwargs": {"trust_remote_code": True}}}, "model_init_kwargs"),
        (
            {"hyperparameters": {"chat_template_path": "/proc/self/environ", "assistant_only_loss": False}},
            "chat_template",
        ),
        ({"hyperparameters": {"chat_template": "/proc/self/environ"}}, "chat_template"),
        ({"hyperparameters": {"chat_template": "../../etc/passwd"}}, "chat_template"),
        ({"output_dir": "."}, "output_dir"),
        ({"output_dir": other}, "output_dir"),
        ({"output_dir": f"{other}/checkpoint-1"}, "output_dir"),
        ({"hyperparameters": {"output_dir": other}}, "output_dir"),
        ({"hyperparameters": {"report_to": "all"}}, "report_to"),
        ({"hyperparameters": {"save_strategy": "no"}}, "save_strategy"),
        ({"hyperparameters": {"use_cpu": True}}, "use_cpu"),
        ({"hyperparameters": {"deepspeed": "/some/file"}}, "deepspeed"),
        ({"hyperparameters": {"fsdp": "full_shard"}}, "fsdp"),
        ({"hyperparameters": {"dataloader_num_workers": 100000}}, "dataloader_num_workers"),
        ({"hyperparameters": {"max_steps": 4611686018427387904}}, "max_steps"),
        ({"hyperparameters": {"push_to_hub": True, "hub_token": "x"}}, "push_to_hub"),
        ({"hyperparameters": {"logging_dir": "/tmp"}}, "logging_dir"),
        ({"hyperparameters": {"resume_from_checkpoint": f"../{other}/checkpoint-1"}}, "resume_from_checkpoint"),
        ({"hyperparameters": {"per_device_train_batch_size": 10**6}}, "per_device_train_batch_size"),
        ({"hyperparameters": {"max_length": 10**7}}, "max_length"),
        ({"hyperparameters": {"lr_scheduler_type": "reduce_lr_on_plateau"}}, "lr_scheduler_type"),
        ({"hyperparameters": {"optim": "galore_adamw"}}, "optim"),
        ({"hyperparameters": {"seed": 2**40}}, "seed"),
        ({"hyperparameters": {"bf16": True, "fp16": True}}, "fp16"),
        ({"lora": {"r": 8, "target_modules": ["q_proj", "../x"]}}, "target_modules"),
        ({"lora": {"r": 8, "target_modules": [f"m{i}" for i in range(65)]}}, "target_modules"),
        ({"lora": {"r": 8, "alpha": 10**9}}, "alpha"),
        ({"lora": {"r": 8, "bias": "all"}}, "bias"),
        ({"junk": "x"}, "junk"),
    ]
    for extra, field in rows:
        refused(api.post("/v1/training-jobs", json={"dataset_id": FAKE_DS, **extra}), field)
    assert api.get("/v1/training-jobs").json() == {"jobs": [], "unreadable": []}
    assert rclient.llen(keys.training.queue()) == 0

    # the 422 names where the setting comes from instead
    r = api.post("/v1/training-jobs", json={"dataset_id": FAKE_DS, "hyperparameters": {"report_to": "wandb"}})
    assert "GRAPE_TRAIN_REPORT_TO" in r.text


def test_non_finite_numbers_are_422_and_the_job_list_stays_200(api) -> None:
    for body in (
        b'{"dataset_id": "%s", "hyperparameters": {"num_train_epochs": Infinity}}' % FAKE_DS.encode(),
        b'{"dataset_id": "%s", "hyperparameters": {"learning_rate": NaN}}' % FAKE_DS.encode(),
        b'{"dataset_id": "%s", "hyperparameters": {"warmup_steps": -Infinity}}' % FAKE_DS.encode(),
        b'{"dataset_id": "%s", "tau": NaN}' % FAKE_DS.encode(),
        b'{"dataset_id": "%s", "lora": {"dropout": NaN}}' % FAKE_DS.encode(),
        b'{"dataset_id": "%s", "hyperparameters": {"max_grad_norm": 1e999}}' % FAKE_DS.encode(),
    ):
        r = api.post("/v1/training-jobs", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.status_code, r.text)
    r = api.get("/v1/training-jobs")
    assert r.status_code == 200 and r.json()["jobs"] == []


def test_a_huge_body_with_a_junk_field_is_refused_and_nothing_is_stored(api, rclient, keys) -> None:
    body = b'{"dataset_id": "%s", "junk": "%s"}' % (FAKE_DS.encode(), b"x" * (8 * 2**20))
    r = api.post("/v1/training-jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (413, 422), r.status_code
    assert len(r.content) < 64 * 1024, len(r.content)  # the junk is not echoed back
    assert rclient.zcard(keys.training.ids()) == 0 and api.get("/v1/training-jobs").json()["jobs"] == []


def test_the_allow_list_is_typed_bounded_and_real_sftconfig_fields() -> None:
    import dataclasses

    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    from trl import SFTConfig

    sft = {f.name for f in dataclasses.fields(SFTConfig)}
    ours = set(Hyperparameters.model_fields) - {"dtype", "chat_template"}  # model load dtype; a template name
    assert ours <= sft, ours - sft
    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}
    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}
    numbers = 0
    for model in (Hyperparameters, LoraSpec):
        for name, field in model.model_fields.items():
            types = set(typing.get_args(field.annotation)) or {field.annotation}
            if types & {int, float}:  # every number has a finite range
                numbers += 1
                assert {type(m).__name__ for m in field.metadata} & {"Le", "Lt"}, f"{name} has no upper bound"
    assert numbers >= 20


def test_the_sft_config_takes_the_operators_settings_never_the_requests(tmp_path) -> None:
    from trainer.sft import checked_max_length, sft_config_kwargs

    spec = JobSpec(dataset_id=FAKE_DS, base_model=MODEL, hyperparameters=Hyperparameters(optim="sgd"))
    kw = sft_config_kwargs(spec, tmp_path / "job-0123456789ab", accelerator=False, settings=Settings())
    assert kw["trust_remote_code"] is False and kw["model_init_kwargs"]["trust_remote_code"] is False
    assert (kw["report_to"], kw["dataloader_num_workers"], kw["save_strategy"]) == ("none", 0, "steps")
    assert kw["push_to_hub"] is False and kw["optim"] == "sgd" and "chat_template_path" not in kw
    operator = Settings(trust_remote_code_models=f"other, {MODEL}", train_report_to="tensorboard")
    kw = sft_config_kwargs(spec, tmp_path / "x", accelerator=False, settings=operator)
    assert kw["trust_remote_code"] is True and kw["model_init_kwargs"]["trust_remote_code"] is True
    assert kw["report_to"] == "tensorboard"

    assert checked_max_length(None, 8192, MODEL) == 8192
    assert checked_max_length(512, 8192, MODEL) == 512
    with pytest.raises(ValueError, match=r"hyperparameters\.max_length 9000 is longer than the context"):
        checked_max_length(9000, 8192, MODEL)


def test_chat_templates_are_names_never_paths(tmp_path) -> None:
    own = tmp_path / "templates"
    own.mkdir()
    (own / "mine.jinja").write_text("{{ messages }}")
    (tmp_path / "outside.jinja").write_text("SECRET")
    assert load_template("mine", own) == "{{ messages }}"
    assert load_template("chatml", None) == BUILTIN["chatml"]
    assert "{% generation %}" in load_template("qwen3", None)  # one of TRL's shipped training templates
    for name in ("../outside", "/proc/self/environ", "mine.jinja/..", ".hidden", "a/b", ""):
        with pytest.raises(UnknownTemplate, match="not a path"):
            load_template(name, own)
    with pytest.raises(UnknownTemplate, match=r"'nope': no such template .*known: chatml, .*mine"):
        load_template("nope", own)
    (own / "huge.jinja").write_bytes(b"x" * (300 * 1024))
    with pytest.raises(UnknownTemplate, match="larger than"):
        load_template("huge", own)


# ---- models are the operator's ---------------------------------------------------------------------------


def test_models_are_the_ones_the_operator_allows(api, settings, rclient, keys, tmp_path) -> None:
    r = api.post("/v1/datasets", json={"name": "x", "target_model": str(tmp_path)})
    refused(r, "target_model")
    assert "GRAPE_ALLOWED_MODELS" in r.json()["detail"] and MODEL in r.json()["allowed_models"]
    assert api.post("/v1/datasets", json={"name": "x", "target_model": MODEL}).status_code == 201
    # a model a live worker serves is allowed by default
    heartbeats.publish(rclient, keys, "w-other", {"name": "w-other", "model": "org/served"})
    assert api.post("/v1/datasets", json={"name": "x", "target_model": "org/served"}).status_code == 201
    with app_with(settings, allowed_models="org/a, org/b") as gw:  # an explicit list replaces the default
        refused(gw.post("/v1/datasets", json={"name": "x", "target_model": MODEL}), "target_model")
        assert gw.post("/v1/datasets", json={"name": "x", "target_model": "org/b"}).status_code == 201
    with app_with(settings, allowed_models="*") as gw:
        assert gw.post("/v1/datasets", json={"name": "x", "target_model": "any/thing"}).status_code == 201


def test_remote_code_never_runs_and_no_file_outside_the_job_is_read_or_written(
    api, settings, worker_factory, trainer_factory, model_path, tmp_path, monkeypatch
) -> None:
    """The issue's first rows, then a real training run of an allowed local model whose config points to
    remote code: trained with the native class, the .py never imported, no secret in any file."""
    evil, marker = remote_code_model(model_path, tmp_path)
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("GRAPE_TEST_SECRET_TOKEN", secret)  # in the training processes' /proc/self/environ
    ds = scored_dataset(api, worker_factory, n=2, candidates=2, start=60)
    hp = {**HP, "max_steps": 2, "per_device_train_batch_size": 2, "max_length": 128, "save_steps": 1}
    base = {"dataset_id": ds, "base_model": str(evil), "lora": {**LORA, "r": 4}}

    # not an allowed model, with or without asking for its code
    refused(api.post("/v1/training-jobs", json=base), "GRAPE_ALLOWED_MODELS")
    for extra in ({"trust_remote_code": True}, {"model_init_kwargs": {"trust_remote_code": True}}):
        refused(api.post("/v1/training-jobs", json={**base, "hyperparameters": {**hp, **extra}}), next(iter(extra)))

    # another job's files, as if it had trained: its directory must stay byte-for-byte the same
    train_dir = tmp_path / "train"
    other = train_dir / "job-aaaaaaaaaaaa"
    (other / "checkpoint-1").mkdir(parents=True)
    (other / "checkpoint-1" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (other / "selection.jsonl").write_bytes(b'{"messages": []}\n')
    before = tree_digest(other)

    with app_with(settings, allowed_models=f"{MODEL},{evil}") as gw:  # the operator allows the directory
        for extra, field in (
            ({"output_dir": "."}, "output_dir"),
            ({"output_dir": other.name}, "output_dir"),
            ({"output_dir": f"{other.name}/checkpoint-1"}, "output_dir"),
            ({"hyperparameters": {**hp, "chat_template_path": "/proc/self/environ"}}, "chat_template_path"),
        ):
            refused(gw.post("/v1/training-jobs", json={**base, **extra}), field)
        unknown = gw.post("/v1/training-jobs", json={**base, "hyperparameters": {**hp, "chat_template": "nope"}})
        assert unknown.status_code == 201, unknown.text  # this gateway has no template dir: the trainer decides
        r = gw.post("/v1/training-jobs", json={**base, "hyperparameters": {**hp, "chat_template": "chatml"}})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        with app_with(settings, chat_template_dir=tmp_path / "templates") as strict:
            (tmp_path / "templates").mkdir()
            refused(
                strict.post("/v1/training-jobs", json={"dataset_id": ds, "hyperparameters": {"chat_template": "nope"}}),
                "nope",
            )

    trainer_factory(launcher="process")  # each job in its own python -m trainer.sft, as grape trainer runs it
    failed = wait_job(api, unknown.json()["id"], ("succeeded", "failed", "cancelled"))
    assert failed["state"] == "failed" and "hyperparameters.chat_template 'nope': no such template" in failed["error"]
    assert "known: " in failed["error"] and "chatml" in failed["error"]
    st = wait_job(api, job_id, ("succeeded", "failed", "cancelled"))
    assert st["state"] == "succeeded", st.get("error")
    out = Path(st["output_dir"])
    assert out == train_dir.resolve() / job_id and st["model_path"] == str(out)
    assert [Path(c).parent for c in st["checkpoints"]] == [out, out]

    assert not marker.exists(), "the model's own Python code ran"
    assert tree_digest(other) == before
    assert sorted(p.name for p in train_dir.iterdir()) == sorted([other.name, job_id, failed["id"]])
    for p in train_dir.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p

    # control: the same directory with its code trusted does run it (so the assertion above can fail)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    code = f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(evil)!r}, trust_remote_code=True)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    assert marker.exists()


# ---- a job owns its directory; jobs can be deleted ---------------------------------------------------------


def test_a_job_writes_only_under_its_own_directory(rclient, keys, settings, tmp_path) -> None:
    loop = TrainerLoop(rclient, keys, settings.model_copy(update={"train_dir": tmp_path / "train"}), name="t")
    assert loop.output_dir("job-0123456789ab") == (tmp_path / "train").resolve() / "job-0123456789ab"
    for bad in ("..", ".", "job-0123456789ab/checkpoint-1", "../job-0123456789ab", "job-XYZ"):
        with pytest.raises(JobError):
            loop.output_dir(bad)
    # a stored spec of an earlier version: its output_dir and pass-through settings are dropped, never used
    old = {"dataset_id": FAKE_DS, "base_model": MODEL, "output_dir": ".", "hyperparameters": {"report_to": "all"}}
    spec = JobSpec.model_validate_json(json.dumps(old))
    assert "output_dir" not in spec.model_dump() and "report_to" not in spec.hyperparameters.model_dump()


def test_jobs_can_be_deleted_but_not_while_running(api, worker_factory, rclient, keys, settings, tmp_path) -> None:
    ds = scored_dataset(api, worker_factory, n=1, candidates=2, start=70)
    queued = api.post("/v1/training-jobs", json={"dataset_id": ds}).json()["id"]
    running = api.post("/v1/training-jobs", json={"dataset_id": ds}).json()["id"]
    assert api.delete(f"/v1/training-jobs/{queued}").status_code == 204
    for path in ("", "/logs"):
        assert api.get(f"/v1/training-jobs/{queued}{path}").status_code == 404
    assert api.delete(f"/v1/training-jobs/{queued}").status_code == 404
    assert not rclient.exists(keys.training.record(queued), keys.training.log(queued))
    assert rclient.lrange(keys.training.queue(), 0, -1) == [running.encode()]

    assert _claim_as(rclient, keys, "live-1") == running
    rclient.set(keys.training.holder("live-1"), b"{}", ex=30)
    r = api.delete(f"/v1/training-jobs/{running}")
    assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
    rclient.delete(keys.training.holder("live-1"))  # its trainer died: reaped (failed), then deletable
    assert api.delete(f"/v1/training-jobs/{running}").status_code == 204
    assert api.get("/v1/training-jobs").json()["jobs"] == []
    for bad in ("job-nope", "ds-0123456789ab", "job-0123456789ab:log"):
        assert api.delete(f"/v1/training-jobs/{bad}").status_code == 404

    # trainers remove the deleted jobs' directories from their disks, and only those
    train = tmp_path / "train"
    loop = TrainerLoop(rclient, keys, settings.model_copy(update={"train_dir": train}), name="t")
    for job_id in (queued, running, "job-bbbbbbbbbbbb"):
        (train / job_id / "checkpoint-1").mkdir(parents=True)
    assert sorted(loop.remove_deleted()) == sorted([queued, running])
    assert sorted(p.name for p in train.iterdir()) == ["job-bbbbbbbbbbbb"]


def test_a_bad_record_in_redis_never_makes_the_job_list_500(api, rclient, keys) -> None:
    good = {"dataset_id": FAKE_DS, "base_model": MODEL}
    bad_spec = {**good, "hyperparameters": {"num_train_epochs": None}}  # Infinity as an old version stored it
    for job_id, spec in (("job-00000000000a", bad_spec), ("job-00000000000b", good)):
        rclient.hset(keys.training.record(job_id), mapping={"id": job_id, "state": "failed", "spec": json.dumps(spec)})
        rclient.hset(keys.training.record(job_id), mapping={"dataset_id": FAKE_DS, "base_model": MODEL, "created": "1"})
        rclient.zadd(keys.training.ids(), {job_id: 1})
    rclient.hset(
        keys.training.record("job-00000000000b"), mapping={"loss": "nan", "grad_norm": "inf"}
    )  # a diverged run
    r = api.get("/v1/training-jobs")
    assert r.status_code == 200, r.text
    assert [j["id"] for j in r.json()["jobs"]] == ["job-00000000000b"] and r.json()["unreadable"] == [
        "job-00000000000a"
    ]
    assert r.json()["jobs"][0]["loss"] is None and r.json()["jobs"][0]["grad_norm"] is None
    r = api.get("/v1/training-jobs/job-00000000000a")
    assert r.status_code == 409 and "DELETE" in r.json()["detail"]
    assert api.delete("/v1/training-jobs/job-00000000000a").status_code == 204
    assert api.get("/v1/training-jobs").json()["unreadable"] == []


# ---- a dead trainer's job, with default settings ---------------------------------------------------------


def test_a_sigkilled_trainers_job_is_resumed_within_a_minute_with_defaults(
    api, worker_factory, rclient, keys, redis_url, tmp_path
) -> None:
    """`grape trainer` killed mid-job; a second trainer with default settings (GRAPE_TRAINER_HEARTBEAT_S unset)
    requeues the job (auto_resume) within 60 s without anyone reading it, and resumes it from its checkpoint."""
    defaults = Settings(redis_url=redis_url, key_prefix=keys.prefix, train_dir=tmp_path / "train")
    assert defaults.trainer_heartbeat_s == 30  # expiry 30 s + a live trainer's reaping pass every 10 s: <= 40 s
    ds = scored_dataset(api, worker_factory, n=2, candidates=2, start=80)
    hp = {**HP, "max_steps": 6, "per_device_train_batch_size": 1, "max_length": 64, "save_steps": 1}
    body = {"dataset_id": ds, "hyperparameters": hp, "lora": {**LORA, "r": 4}, "auto_resume": True}
    job_id = api.post("/v1/training-jobs", json=body).json()["id"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPE_TRAINER_HEARTBEAT")}
    env.update({"REDIS_URL": redis_url, "GRAPE_KEY_PREFIX": keys.prefix, "GRAPE_TRAIN_DIR": str(tmp_path / "train")})
    cmd = [sys.executable, "-m", "grape.cli", "trainer", "--launcher", "inline", "--name", "doomed", "--max-jobs", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not rclient.hget(keys.training.record(job_id), "checkpoints") or b"checkpoint-" not in rclient.hget(
            keys.training.record(job_id), "checkpoints"
        ):
            assert proc.poll() is None and time.monotonic() < deadline, rclient.hgetall(keys.training.record(job_id))
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert rclient.hget(keys.training.record(job_id), "state") == b"running" and rclient.exists(
        keys.training.holder("doomed")
    )

    live = TrainerLoop(rclient, keys, defaults, name="survivor")  # default heartbeat and reaping interval
    thread = threading.Thread(target=live.run, kwargs={"max_jobs": 1}, daemon=True)
    thread.start()
    try:
        while (
            rclient.hget(keys.training.record(job_id), "trainer") == b"doomed"
        ):  # read from Redis: nothing reaps on read
            assert time.monotonic() - killed < 60, "the dead trainer's job was not taken over within a minute"
            time.sleep(0.2)
        taken = time.monotonic() - killed
        st = wait_job(api, job_id, ("succeeded", "failed", "cancelled"))
    finally:
        live.stop()
        thread.join(timeout=300)
    print(f"\nSIGKILLed trainer: its job was requeued {taken:.1f}s later (default settings)")
    assert st["state"] == "succeeded" and st["attempts"] == 2 and st["step"] == 6, st
    msgs = [json.loads(x)["msg"] for x in api.get(f"/v1/training-jobs/{job_id}/logs").text.splitlines()]
    assert any("trainer doomed stopped sending heartbeats" in m for m in msgs)
    assert any("resuming from" in m and "checkpoint-" in m for m in msgs)
