"""/metrics on the gateway (read from Redis) and on a worker, in the Prometheus text format."""

from __future__ import annotations

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from grape.settings import Settings
from grape.store.scoring import chunked
from service import metrics as service_metrics
from service.app import create_app
from tests.conftest import MODEL, create, load_pool, wait_done
from workers import metrics as worker_metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value}; raises if the text is not valid exposition format."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float | None:
    return parsed.get((name, tuple(sorted(labels.items()))))


def scrape(api: TestClient) -> dict:
    r = api.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(r.text)


def test_gateway_metrics_follow_a_dataset_from_queue_to_scores(api, worker_factory, hf_backend, settings) -> None:
    items = load_pool(3, start=40, max_chars=200, candidates=3)
    too_long = {
        "id": "too-long",
        "instruction": "Repeat.",
        "candidates": [{"source": "a", "response": "ok"}, {"source": "b", "response": "word " * 9000}],
    }
    upload = [*items, too_long]
    ds = create(api)
    assert api.post(f"/v1/datasets/{ds}/items", json={"items": upload}).json()["accepted"] == 4
    n_chunks = len(chunked(upload, settings.chunk_pairs))

    before = scrape(api)
    model = {"model": MODEL, "task": "logprob"}
    per_ds = {"dataset": ds, "model": MODEL}
    assert value(before, "grape_up") == 1
    assert value(before, "grape_queue_entries", **model) == n_chunks  # queue depth, nothing read yet
    assert value(before, "grape_queue_pending", **model) == 0
    assert value(before, "grape_dataset_items_total", **per_ds) == 4
    assert value(before, "grape_dataset_pairs_total", **per_ds) == 11
    assert value(before, "grape_dataset_pairs_scored_total", **per_ds) == 0
    assert value(before, "grape_datasets", state="scoring") == 1

    worker_factory(backend=worker_metrics.InstrumentedBackend(hf_backend, MODEL))
    st = wait_done(api, ds)

    after = scrape(api)
    assert value(after, "grape_dataset_items_scored_total", **per_ds) == 3
    assert value(after, "grape_dataset_pairs_scored_total", **per_ds) == 9
    assert value(after, "grape_dataset_tokens_scored_total", **per_ds) == st["tokens_scored"] > 0
    assert value(after, "grape_dataset_items_failed", **per_ds) == 1
    assert value(after, "grape_dataset_pairs_failed", **per_ds) == 2
    assert value(after, "grape_dataset_throughput_tokens_per_second", **per_ds) > 0
    assert value(after, "grape_queue_entries", **model) == 0  # acked and deleted
    assert value(after, "grape_queue_pending", **model) == 0
    assert value(after, "grape_workers", **model) == 1
    assert value(after, "grape_datasets", state="done") == 1
    # what each live worker scores with: on /metrics and on GET /v1/workers
    (worker,) = api.get("/v1/workers").json()["workers"]
    assert worker["model"] == MODEL and worker["task"] == "logprob" and worker["backend"] == "hf"
    assert worker["path"] == hf_backend.info()["path"] and worker["dtype"] == hf_backend.info()["dtype"]
    backend_labels = {
        "worker": worker["name"],
        "model": MODEL,
        "task": "logprob",
        "backend": "hf",
        "path": worker["path"],
        "dtype": worker["dtype"],
        "prefix_reuse": "",  # the hf backend shares prefixes by itself; the label is vLLM's
    }
    assert value(after, "grape_worker_backend", **backend_labels) == 1

    # the worker's own counters (this process's registry: the worker ran in a thread here)
    from prometheus_client import REGISTRY, generate_latest

    mine = samples(generate_latest(REGISTRY).decode())
    labels = {"model": MODEL, "task": "logprob", "dataset": ds}
    assert value(mine, "grape_worker_items_scored_total", **labels) == 3
    assert value(mine, "grape_worker_pairs_scored_total", **labels) == 9
    assert value(mine, "grape_worker_tokens_scored_total", **labels) == st["tokens_scored"]
    assert value(mine, "grape_worker_items_failed_total", **labels) == 1
    assert value(mine, "grape_worker_pairs_failed_total", **labels) == 2
    assert value(mine, "grape_worker_batch_seconds_count", model=MODEL) >= 1
    assert value(mine, "grape_worker_batch_pairs_sum", model=MODEL) >= 9


def test_metrics_are_open_when_the_api_needs_keys(redis_url, keys) -> None:
    settings = Settings(redis_url=redis_url, key_prefix=keys.prefix, api_keys="secret-1")
    with TestClient(create_app(settings)) as api:
        assert api.get("/v1/datasets").status_code == 401
        assert api.get("/metrics").status_code == 200
        assert api.get("/").status_code == 200 and "<html" in api.get("/").text
        # OpenMetrics when the scraper asks for it
        r = api.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.rstrip().endswith("# EOF")


def test_gateway_reports_redis_down_instead_of_failing(monkeypatch) -> None:
    """A scrape answers quickly with grape_up 0 while the Redis client is still retrying."""
    monkeypatch.setattr(service_metrics, "SCRAPE_TIMEOUT_S", 1.0)
    settings = Settings(redis_url="redis://127.0.0.1:1/0", key_prefix="grape-test-down")
    with TestClient(create_app(settings)) as api:
        parsed = scrape(api)
    assert value(parsed, "grape_up") == 0
    assert not any(name.startswith("grape_dataset") for name, _ in parsed)


def test_worker_metrics_server_serves_metrics_and_probes() -> None:
    worker_metrics.record_results("probe-model", "logprob", "ds-probe", [])
    server = worker_metrics.MetricsServer(0, "127.0.0.1", check=lambda: True).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/ready").status_code == 503  # model not loaded yet
        worker_metrics.mark_ready("probe-model", server)
        assert httpx.get(f"{base}/ready").status_code == 200
        r = httpx.get(f"{base}/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        parsed = samples(r.text)
        assert value(parsed, "grape_worker_ready", model="probe-model") == 1
        for family in ("grape_worker_pairs_scored_total", "grape_worker_batch_seconds"):
            assert f"# TYPE {family} " in r.text
    finally:
        server.stop()
    failing = worker_metrics.MetricsServer(0, "127.0.0.1", check=lambda: 1 / 0).start()
    try:
        failing.loaded.set()
        assert httpx.get(f"http://127.0.0.1:{failing.port}/ready").status_code == 503  # Redis check raised
    finally:
        failing.stop()
