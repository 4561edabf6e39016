"""`grape demo` as a user runs it: its own Redis, a gateway and a worker process, the bundled pool."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from grape.demo import EXAMPLE_POOL


def test_demo_runs_the_whole_path_and_reports_wins(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "GRAPE_REDIS_URL")}
    out = tmp_path / "demo"
    proc = subprocess.run(  # a relative --out, as in the README's demo command run from the repository
        [sys.executable, "-m", "grape.cli", "demo", "--limit", "4", "--out", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "started a private Redis" in proc.stdout
    assert "selected  share" in proc.stdout
    lines = (out / "selection.jsonl").read_bytes().splitlines()
    assert len(lines) == 4
    records = [orjson.loads(x) for x in lines]
    sources = {
        c["source"] for row in map(orjson.loads, EXAMPLE_POOL.read_bytes().splitlines()[:4]) for c in row["candidates"]
    }
    assert all(r["source"] in sources and r["messages"][-1]["role"] == "assistant" for r in records)
    assert str((out / "selection.jsonl").resolve()) in proc.stdout


def test_example_pool_is_well_formed() -> None:
    rows = [orjson.loads(x) for x in EXAMPLE_POOL.read_bytes().splitlines()]
    assert len(rows) >= 24
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["instruction"].strip() and len(r["candidates"]) >= 3
        assert len({c["source"] for c in r["candidates"]}) == len(r["candidates"])
