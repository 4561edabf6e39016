"""A small HTTP client of the gateway, used by the CLI and the demo (and handy in notebooks)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

RETRY_STATUSES = {429, 502, 503, 504}


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class GrapeClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 120, retries: int = 8):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> GrapeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Retries refusals under load (429 with Retry-After) and lost connections, with backoff.
        Uploads are idempotent by item id, so re-sending after a lost answer never duplicates work."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                resp = self.http.request(method, path, **kw)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if resp.status_code not in RETRY_STATUSES or attempt == self.retries:
                    if resp.status_code >= 400:
                        try:
                            detail = resp.json()
                        except ValueError:
                            detail = resp.text
                        raise ApiError(resp.status_code, detail)
                    return resp
                retry_after = resp.headers.get("Retry-After")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = float(retry_after)
            time.sleep(delay)
            delay = min(delay * 2, 30)
        raise AssertionError("unreachable")

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    def create_dataset(self, name: str, target_model: str, template: str = "auto") -> dict[str, Any]:
        body = {"name": name, "target_model": target_model, "template": template}
        return self._request("POST", "/v1/datasets", json=body).json()

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
        on_batch: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Upload in NDJSON batches; returns totals, with rejected indices counted across the whole file."""
        totals: dict[str, Any] = {"accepted": 0, "duplicates": 0, "rejected": []}
        buf: list[dict[str, Any]] = []
        offset = 0

        def flush() -> None:
            nonlocal offset
            res = self.upload(dataset_id, buf)
            totals["accepted"] += res["accepted"]
            totals["duplicates"] += res["duplicates"]
            totals["rejected"] += [{**r, "index": r["index"] + offset} for r in res["rejected"]]
            if on_batch:
                on_batch(len(buf), res)
            offset += len(buf)
            buf.clear()

        for it in items:
            buf.append(it)
            if len(buf) >= batch:
                flush()
        if buf:
            flush()
        return totals

    def status(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/datasets/{dataset_id}").json()

    def item(self, dataset_id: str, item_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/datasets/{dataset_id}/items/{item_id}").json()

    def selection(self, dataset_id: str, **params: Any) -> Iterator[dict[str, Any]]:
        with self.http.stream("GET", f"/v1/datasets/{dataset_id}/selection", params=params) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise ApiError(resp.status_code, resp.json())
            for line in resp.iter_lines():
                if line.strip():
                    yield orjson.loads(line)

    def export(self, dataset_id: str, path: str | Path, **params: Any) -> int:
        n = 0
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for rec in self.selection(dataset_id, **params):
                f.write(orjson.dumps(rec) + b"\n")
                n += 1
        return n
