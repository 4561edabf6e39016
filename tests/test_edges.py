"""Issue 19, edges: /metrics without a key carries no tenant data, and the request-head limit holds however
the head arrives (the process-death edges are in test_process_death.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from grape.keys import Keys
from grape.models import resolve_model
from grape.settings import Settings
from service.app import create_app
from tests.conftest import MODEL, load_pool, start_gateway, wait_done
from tests.test_metrics import samples, value
from workers.backends import BackendConfig, load_backend

KEY = "edges-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_KEY = "edges-admin-1"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SECRET_MODEL = "acme/secret-model"  # a tenant's own string: GRAPE_ALLOWED_MODELS=* lets a dataset name any
WORKER = "gpu-box-7-worker"


def scrape(api: TestClient, headers: dict[str, str] | None = None) -> tuple[str, dict]:
    r = api.get("/metrics", headers=headers or {})
    assert r.status_code == 200, r.text
    return r.text, samples(r.text)


@pytest.fixture
def fleet(redis_url: str, keys: Keys, worker_factory) -> Iterator[tuple[Settings, str, str]]:
    """A keyed gateway's store with two datasets: one scored by a live (null) worker of the bundled model, one
    queued for a model no worker serves. Yields (settings, dataset of the bundled model, the other dataset)."""
    settings = Settings(
        redis_url=redis_url,
        key_prefix=keys.prefix,
        api_keys=KEY,
        admin_keys=ADMIN_KEY,
        chunk_pairs=4,
        allowed_models="*",
    )
    with TestClient(create_app(settings), headers=AUTH) as api:
        items = load_pool(3, start=60, max_chars=100, candidates=2)
        ds = api.post("/v1/datasets", json={"name": "team-a-pool", "target_model": MODEL}).json()["id"]
        other = api.post("/v1/datasets", json={"name": "team-b-pool", "target_model": SECRET_MODEL}).json()["id"]
        for d in (ds, other):
            assert api.post(f"/v1/datasets/{d}/items", json={"items": items}).json()["accepted"] == 3
        null = load_backend("null", BackendConfig(model=resolve_model(MODEL)))
        worker_factory(backend=null, name=WORKER)
        wait_done(api, ds, timeout=60)
    yield settings, ds, other


def test_metrics_without_a_key_carry_no_dataset_ids_nor_worker_names(fleet) -> None:
    settings, ds, other = fleet
    with TestClient(create_app(settings)) as api:
        # no key, a wrong one, a malformed header, and a tenant's valid key: a tenant must not see the others'
        for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": KEY}, AUTH):
            text, got = scrape(api, headers)
            for secret in (ds, other, WORKER, SECRET_MODEL, "team-a-pool", "team-b-pool"):
                assert secret not in text, (headers, secret)
            assert "grape_dataset_" not in text and "grape_worker_backend" not in text
            # the fleet-wide view is all there: per model, the tenant's own model counted as `other`
            assert value(got, "grape_model_pairs", model=MODEL) == 6
            assert value(got, "grape_model_pairs_scored", model=MODEL) == 6
            assert value(got, "grape_model_pairs", model="other") == 6
            assert value(got, "grape_model_pairs_scored", model="other") == 0
            assert value(got, "grape_queue_entries", model="other", task="logprob") == 2  # 6 pairs, 4 per chunk
            assert value(got, "grape_workers", model=MODEL, task="logprob") == 1
            kind = {"model": MODEL, "task": "logprob", "backend": "null", "dtype": "none", "prefix_reuse": ""}
            assert value(got, "grape_workers_by_backend", path="null (no model)", **kind) == 1
            assert value(got, "grape_datasets", state="done") == 1

        # an admin (operator) key sees the per-dataset and per-worker series
        text, got = scrape(api, ADMIN)
        assert value(got, "grape_dataset_pairs_total", dataset=ds, model=MODEL) == 6
        assert value(got, "grape_dataset_pairs_total", dataset=other, model=SECRET_MODEL) == 6
        assert value(got, "grape_model_pairs", model=SECRET_MODEL) == 6
        assert value(got, "grape_worker_backend", worker=WORKER, path="null (no model)", **kind) == 1


def test_the_operator_may_open_the_detail_to_every_scraper(fleet) -> None:
    settings, ds, _ = fleet
    with TestClient(create_app(settings.model_copy(update={"metrics_detail": True}))) as api:
        text, got = scrape(api)
    assert value(got, "grape_dataset_pairs_scored_total", dataset=ds, model=MODEL) == 6
    assert WORKER in text


# ---- the request-head limit (GRAPE_MAX_HEADER_BYTES, 64 KiB by default) ----------------------------------


@pytest.fixture
def gateway_port(redis_url: str, keys: Keys) -> Iterator[int]:
    proc, url = start_gateway(redis_url, keys, GRAPE_API_KEYS=KEY)
    try:
        yield httpx.URL(url).port  # type: ignore[misc]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _exchange(port: int, pieces: list[bytes], pause: float = 0.0) -> tuple[bytes, bool]:
    """Send `pieces` (one write each), read the answer to its end: (answer, whether the server closed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    answer = b""
    try:
        try:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(pause)
        except OSError:  # the server answered and closed before the rest was written
            pass
        try:
            while chunk := sock.recv(65536):
                answer += chunk
            closed = True
        except TimeoutError:  # still open after the answer: kept alive
            closed = False
        except ConnectionResetError:
            closed = True
    finally:
        sock.close()
    return answer, closed


def _head(pad: int) -> bytes:
    return (
        f"GET /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\nX-Pad: ".encode()
        + b"a" * pad
        + b"\r\n\r\n"
    )


@pytest.mark.parametrize("path", ["/v1/datasets", "/healthz", "/metrics", "/no-such-route"])
def test_a_100kb_head_in_one_write_is_refused(gateway_port: int, path: str) -> None:
    head = _head(100_000).replace(b"/v1/datasets", path.encode(), 1)
    answer, closed = _exchange(gateway_port, [head])
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"GRAPE_MAX_HEADER_BYTES" in answer and closed


def test_a_100kb_head_in_pieces_is_refused(gateway_port: int) -> None:
    head = _head(100_000)
    answer, closed = _exchange(gateway_port, [head[i : i + 8192] for i in range(0, len(head), 8192)], pause=0.01)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"GRAPE_MAX_HEADER_BYTES" in answer and closed


def test_a_head_just_under_the_limit_is_served(gateway_port: int) -> None:
    ok = _head(60_000).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    answer, closed = _exchange(gateway_port, [ok])
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    normal = httpx.get(f"http://127.0.0.1:{gateway_port}/v1/datasets", headers=AUTH)
    assert normal.status_code == 200 and "datasets" in normal.json()
