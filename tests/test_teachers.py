"""Teacher selection: per source, mean local (LALP) and mean GRAPE score, both rankings side by side, in the
route's bounded answer and in `grape teachers`."""

from __future__ import annotations

import time

import orjson

from grape.cli import main as cli_main
from grape.client import GrapeClient
from grape.strategies import ScoredItem
from service.teachers import _Tally
from tests.conftest import MODEL
from tests.test_local_scores import reasoning_items

NO_LOCAL = {"id": "3", "candidates": [{"source": "a", "response": "r"}]}


def row(item_id: str, sources: list[str], grape: list[float], local: list[float]) -> ScoredItem:
    item = {"id": item_id, "instruction": "q", "candidates": [{"source": s, "response": "r"} for s in sources]}
    scores = [{"logprob_sum": g * 10, "tokens": 10, "prompt_tokens": 5} for g in grape]
    return ScoredItem(item, scores, {"local": [{"local": x} for x in local]})


def test_rankings_side_by_side_bounded_with_their_correlation() -> None:
    tally = _Tally()
    # GRAPE prefers a > b > c, local the reverse; d answered only one instruction; one item lacks local
    tally.add(
        [
            row("1", ["a", "b", "c", "d"], [-1.0, -2.0, -3.0, -2.5], [-3.0, -2.0, -1.0, -2.5]),
            row("2", ["a", "b", "c"], [-1.0, -2.0, -3.0], [-3.0, -2.0, -1.0]),
            ScoredItem(NO_LOCAL, [{"logprob_sum": 0, "tokens": 2}]),
        ]
    )
    full = tally.result("ds-x", max_sources=10)
    assert full.scored_items == 2 and full.sources_total == 4
    assert [(t.source, t.local_rank, t.grape_rank) for t in full.sources] == [
        ("c", 1, 4),
        ("b", 2, 2),
        ("d", 3, 3),
        ("a", 4, 1),
    ]
    assert abs(full.rank_correlation - -0.8) < 1e-12  # 1 - 6 * (9 + 0 + 0 + 9) / (4 * 15)
    a = next(t for t in full.sources if t.source == "a")
    assert (a.instructions, a.candidates, a.grape_mean, a.local_mean) == (2, 2, -1.0, -3.0)
    # bounded: the sources that answered most are listed, the rest counted, ranks still over all of them
    capped = tally.result("ds-x", max_sources=3)
    assert [t.source for t in capped.sources] == ["c", "b", "a"] and capped.sources_total == 4
    assert capped.sources[2].local_rank == 4


def test_grape_teachers_prints_the_ranking(live_gateway, worker_factory, capsys) -> None:
    client = GrapeClient(live_gateway)
    ds = client.create_dataset("t", MODEL, scores=["logprob", "local"], local_window=1)["id"]
    client.upload(ds, reasoning_items(2))
    worker_factory(task="logprob", name="w-logprob")
    worker_factory(task="local", name="w-local")
    deadline = time.monotonic() + 600
    while client.status(ds)["state"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    want = client.teachers(ds)
    assert cli_main(["teachers", ds, "--url", live_gateway]) == 0
    out = capsys.readouterr().out
    assert f"dataset {ds}: 2 instructions" in out and "rank correlation (Spearman)" in out
    lines = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("stepwise", "dense")]
    assert len(lines) == 2
    for t in want["sources"]:
        shown = next((x for x in lines if x[0] == t["source"]), None)
        if shown:
            assert shown[1:] == [
                str(t["instructions"]),
                f"{t['local_mean']:.4f}",
                str(t["local_rank"]),
                f"{t['grape_mean']:.4f}",
                str(t["grape_rank"]),
            ]
    assert cli_main(["teachers", ds, "--url", live_gateway, "--json"]) == 0
    got = orjson.loads(capsys.readouterr().out)
    assert got["sources"] == want["sources"]
    # a dataset without local scores: the gateway's 422 (with the request that adds them), exit code 1
    plain = client.create_dataset("t", MODEL)["id"]
    assert cli_main(["teachers", plain, "--url", live_gateway]) == 1
    assert "scores" in capsys.readouterr().err


def test_status_page_ranks_the_teachers(live_gateway, worker_factory, tmp_path) -> None:
    from tests.test_status_page import browser_page, ensure_binary, wait_js

    chromium = ensure_binary("chromium", "chromium")
    client = GrapeClient(live_gateway)
    ds = client.create_dataset("t", MODEL, scores=["logprob", "local"], local_window=1)["id"]
    client.upload(ds, reasoning_items(2))
    worker_factory(task="logprob", name="w-logprob")
    worker_factory(task="local", name="w-local")
    deadline = time.monotonic() + 600
    while client.status(ds)["state"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    want = client.teachers(ds)
    with browser_page(chromium) as page:
        page.goto(f"{live_gateway}/#{ds}")
        wait_js(page, "document.querySelectorAll('#teachers tbody tr').length === 3", 30)
        rows = page.evaluate(
            "[...document.querySelectorAll('#teachers tbody tr')].map(r => [...r.cells].map(c => c.textContent))"
        )
        assert rows == [
            [
                t["source"],
                str(t["instructions"]),
                f"{t['local_mean']:.3f}",
                str(t["local_rank"]),
                f"{t['grape_mean']:.3f}",
                str(t["grape_rank"]),
            ]
            for t in want["sources"]
        ]
        assert page.evaluate("document.getElementById('teachers-box').hidden") is False
        assert "rank correlation" in page.evaluate("document.getElementById('teachers-note').textContent")
        assert page.evaluate("window.__errors") == []
        page.screenshot(path=str(tmp_path / "teachers.png"), full_page=True)
