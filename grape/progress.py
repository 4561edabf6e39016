"""Progress bars fed by the gateway's status endpoint."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from grape.client import GrapeClient
from grape.store.jobqueue import TERMINAL


def watch_scoring(
    client: GrapeClient,
    dataset_id: str,
    *,
    interval: float = 1.0,
    timeout: float | None = None,
    check: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Show a bar over the dataset's candidates until every one is scored or failed."""
    st = client.status(dataset_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    with tqdm(total=st["candidates"], unit="pair", desc="scoring", dynamic_ncols=True) as bar:
        while True:
            done = st["scored_candidates"] + st["failed_candidates"]
            bar.total = st["candidates"]
            bar.n = done
            tput = st.get("throughput_tokens_per_s")
            bar.set_postfix(
                tok_s=f"{tput:.0f}" if tput else "-",
                failed=st["failed_candidates"],
                workers=st["workers"],
                refresh=False,
            )
            bar.refresh()
            if st["state"] == "done":
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"dataset {dataset_id} not done after {timeout}s: {st}")
            if check:
                check()
            time.sleep(interval)
            st = client.status(dataset_id)


def watch_training(
    client: GrapeClient,
    job_id: str,
    *,
    interval: float = 1.0,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Show a bar over the job's optimizer steps until it succeeds, fails or is cancelled."""
    st = client.training_job(job_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    with tqdm(total=st.get("max_steps"), unit="step", desc=st["state"], dynamic_ncols=True) as bar:
        while True:
            if bar.total is None and st.get("max_steps"):
                bar.reset(total=st["max_steps"])  # training began: the rate counts steps, not model loading
            bar.n = st.get("step") or 0
            bar.set_description(st["state"], refresh=False)
            loss, lr, eta = st.get("loss"), st.get("learning_rate"), st.get("eta_seconds")
            bar.set_postfix(
                loss=f"{loss:.4f}" if loss is not None else "-",
                lr=f"{lr:.2e}" if lr is not None else "-",
                eta=f"{eta:.0f}s" if eta is not None else "-",
                refresh=False,
            )
            bar.refresh()
            if st["state"] in TERMINAL:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training job {job_id} not finished after {timeout}s: {st['state']}")
            time.sleep(interval)
            st = client.training_job(job_id)
