"""A small HTTP client of the gateway, used by the CLI and the demo (and handy in notebooks)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson

RETRY_STATUSES = {429, 502, 503, 504}


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def _checked(resp: httpx.Response) -> httpx.Response:
    """The response, or ApiError with the gateway's JSON detail (its text when the body is not JSON)."""
    if resp.status_code < 400:
        return resp
    try:
        detail = resp.json()
    except ValueError:
        detail = resp.text
    raise ApiError(resp.status_code, detail)


class GrapeClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120,
        retries: int = 8,
        max_wait: float = 3600,
        on_wait: Callable[[int, float], None] | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries
        self.max_wait = max_wait
        self.on_wait = on_wait

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> GrapeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Waits out refusals under load (429/503 with Retry-After) for up to `max_wait` seconds, and
        retries lost connections `retries` times with backoff. Uploads are idempotent by item id, so
        re-sending after a lost answer never duplicates work."""
        delay = 0.5
        failures = 0
        deadline = time.monotonic() + self.max_wait
        while True:
            try:
                resp = self.http.request(method, path, **kw)
            except httpx.TransportError:
                failures += 1
                if failures > self.retries:
                    raise
                wait = delay
            else:
                if resp.status_code not in RETRY_STATUSES or time.monotonic() > deadline:
                    return _checked(resp)
                retry_after = resp.headers.get("Retry-After", "")
                wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else delay
                if self.on_wait:
                    self.on_wait(resp.status_code, wait)
            time.sleep(wait)
            delay = min(delay * 2, 30)

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    def create_dataset(
        self,
        name: str,
        target_model: str,
        template: str = "auto",
        *,
        scores: list[str] | None = None,
        scorer_model: str | None = None,
        embedding_model: str | None = None,
        local_segmentation: str | None = None,
        local_window: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "target_model": target_model, "template": template}
        extra = {
            "scores": scores,
            "scorer_model": scorer_model,
            "embedding_model": embedding_model,
            "local_segmentation": local_segmentation,
            "local_window": local_window,
        }
        body.update({k: v for k, v in extra.items() if v is not None})
        return self._request("POST", "/v1/datasets", json=body).json()

    def request_scores(self, dataset_id: str, scores: list[str], **models: str | None) -> dict[str, Any]:
        """Ask for more score kinds (rating, embedding, unconditioned...); stored items are queued for them."""
        body = {"scores": scores, **{k: v for k, v in models.items() if v is not None}}
        return self._request("POST", f"/v1/datasets/{dataset_id}/scores", json=body).json()

    def teachers(self, dataset_id: str) -> dict[str, Any]:
        """Sources ranked by mean local (LALP) and mean GRAPE score (GET /v1/datasets/{id}/teachers)."""
        return self._request("GET", f"/v1/datasets/{dataset_id}/teachers").json()

    def compare(self, dataset_id: str, strategies: list[str], **params: Any) -> dict[str, Any]:
        """Strategies side by side on the scored pool (GET /v1/datasets/{id}/compare)."""
        query = {"strategies": ",".join(strategies), **{k: v for k, v in params.items() if v is not None}}
        return self._request("GET", f"/v1/datasets/{dataset_id}/compare", params=query).json()

    def upload(self, dataset_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        body = b"".join(orjson.dumps(it) + b"\n" for it in items)
        return self._request(
            "POST",
            f"/v1/datasets/{dataset_id}/items",
            content=body,
            headers={"Content-Type": "application/x-ndjson"},
        ).json()

    def upload_all(
        self,
        dataset_id: str,
        items: Iterable[dict[str, Any]],
        *,
        batch: int = 500,
        max_bytes: int = 4 * 2**20,
        on_batch: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Upload in NDJSON batches of at most `batch` items and about `max_bytes` (under the gateway's
        GRAPE_MAX_BODY_BYTES); returns totals, with rejected indices counted across the whole file."""
        totals: dict[str, Any] = {"accepted": 0, "duplicates": 0, "rejected": [], "rejected_total": 0}
        buf: list[dict[str, Any]] = []
        size = 0
        offset = 0

        def flush() -> None:
            nonlocal offset
            res = self.upload(dataset_id, buf)
            totals["accepted"] += res["accepted"]
            totals["duplicates"] += res["duplicates"]
            totals["rejected"] += [{**r, "index": r["index"] + offset} for r in res["rejected"]]
            totals["rejected_total"] += res.get("rejected_total", len(res["rejected"]))
            if on_batch:
                on_batch(len(buf), res)
            offset += len(buf)
            buf.clear()

        for it in items:
            line = len(orjson.dumps(it)) + 1
            if buf and size + line > max_bytes:
                flush()
                size = 0
            buf.append(it)
            size += line
            if len(buf) >= batch:
                flush()
                size = 0
        if buf:
            flush()
        return totals

    def status(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/datasets/{dataset_id}").json()

    def item(self, dataset_id: str, item_id: str) -> dict[str, Any]:
        # any characters may be in an item id: encode every one the path would read otherwise ('.' too, so a
        # client never collapses an id like `..` as a path segment)
        return self._request(
            "GET", f"/v1/datasets/{dataset_id}/items/{quote(item_id, safe='').replace('.', '%2E')}"
        ).json()

    def selection(self, dataset_id: str, **params: Any) -> Iterator[dict[str, Any]]:
        params = {k: v for k, v in params.items() if v is not None}
        with self.http.stream("GET", f"/v1/datasets/{dataset_id}/selection", params=params) as resp:
            if resp.status_code >= 400:
                resp.read()
                _checked(resp)
            for line in resp.iter_lines():
                if line.strip():
                    yield orjson.loads(line)

    # training jobs ---------------------------------------------------------------------------------
    def create_training_job(self, body: dict[str, Any]) -> dict[str, Any]:
        """One attempt, no retry: a lost answer must not start the same training twice."""
        return _checked(self.http.post("/v1/training-jobs", json=body)).json()

    def training_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/training-jobs/{job_id}").json()

    def cancel_training_job(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/training-jobs/{job_id}/cancel").json()

    def resume_training_job(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/training-jobs/{job_id}/resume").json()

    def training_logs(self, job_id: str, *, follow: bool = False) -> Iterator[dict[str, Any]]:
        params = {"follow": "true" if follow else "false"}
        with self.http.stream("GET", f"/v1/training-jobs/{job_id}/logs", params=params, timeout=None) as resp:
            if resp.status_code >= 400:
                resp.read()
                _checked(resp)
            for line in resp.iter_lines():
                if line.strip():
                    yield orjson.loads(line)

    # experiments -----------------------------------------------------------------------------------
    def create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        """One attempt, no retry: a lost answer must not start the same experiment twice."""
        return _checked(self.http.post("/v1/experiments", json=body)).json()

    def experiment(self, exp_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/experiments/{exp_id}").json()

    def experiments(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/experiments").json()["experiments"]

    def cancel_experiment(self, exp_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/experiments/{exp_id}/cancel").json()

    def delete_experiment(self, exp_id: str, *, with_runs: bool = False) -> None:
        """Remove an ended experiment and its stored selections (`with_runs`: its jobs and evaluations too)."""
        self._request("DELETE", f"/v1/experiments/{exp_id}", params={"with_runs": "true" if with_runs else "false"})

    def experiment_selection(self, exp_id: str, arm: int) -> list[dict[str, Any]]:
        text = self._request("GET", f"/v1/experiments/{exp_id}/arms/{arm}/selection").content
        return [orjson.loads(line) for line in text.splitlines() if line.strip()]

    # evaluations -----------------------------------------------------------------------------------
    def create_evaluation(self, body: dict[str, Any]) -> dict[str, Any]:
        """One attempt, no retry: a lost answer must not queue the same evaluation twice."""
        return _checked(self.http.post("/v1/evaluations", json=body)).json()

    def evaluation(self, eval_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/evaluations/{eval_id}").json()

    def cancel_evaluation(self, eval_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/evaluations/{eval_id}/cancel").json()

    def delete_evaluation(self, eval_id: str) -> None:
        """Remove an ended evaluation and its log."""
        self._request("DELETE", f"/v1/evaluations/{eval_id}")

    # tenants ---------------------------------------------------------------------------------------
    def usage(self) -> dict[str, Any]:
        """The caller's tenant's usage and limits per quota (an admin: every tenant's, in `tenants`)."""
        return self._request("GET", "/v1/usage").json()

    def export(self, dataset_id: str, path: str | Path, **params: Any) -> int:
        n = 0
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for rec in self.selection(dataset_id, **params):
                f.write(orjson.dumps(rec) + b"\n")
                n += 1
        return n
