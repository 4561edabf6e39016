"""The documentation: the README's commands match .ci/run, the site builds strictly, and every reference page
is what the code generates now (so a strategy, setting, hyperparameter, route or flag cannot land undocumented).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from grape import docs_reference, strategies
from grape.settings import Settings
from grape.strategies.base import Pick, ScoredItem, SelectParams, StrategySpec, streamed
from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250


def _fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```$", text, flags=re.M | re.S)


def test_ci_runs_the_readme_test_command() -> None:
    readme = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = [line for line in ci.splitlines() if line.startswith("python3.11 -m venv")][0]
    assert command in readme
    blocks = readme.split("```bash\n")
    assert blocks[2].startswith(command)  # the second command of the README
    assert "grape demo" in blocks[1].splitlines()[0]
    assert blocks[1].startswith("python3.11 -m venv .venv && .venv/bin/pip install -e .")


def test_readme_is_the_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move sections into docs/"


def test_readme_links_into_the_site_resolve() -> None:
    """Relative links, so they work on GitHub as well as in the site."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


def test_readme_demo_output_and_picture_are_the_sites() -> None:
    """The README shows the demo's output and the picture of how it works; the site holds the same text."""
    readme_blocks = _fenced_blocks(README.read_text())
    demo = next(b for b in readme_blocks if b.startswith("dataset ds-"))
    picture = next(b for b in readme_blocks if b.startswith("client --POST items"))
    assert demo in _fenced_blocks((DOCS / "quickstart.md").read_text())
    assert picture in _fenced_blocks((DOCS / "concepts" / "queue.md").read_text())


def test_every_setting_is_in_the_settings_reference() -> None:
    page = (DOCS / "reference" / "settings.md").read_text()
    missing = []
    for name, field in Settings.model_fields.items():
        env = docs_reference.env_name(Settings, name)
        if f"`{env}`" not in page:
            missing.append(env)
        assert field.description, f"setting {name} has no description"
    assert docs_reference.env_name(Settings, "redis_url") == "REDIS_URL"
    assert not missing, f"docs/reference/settings.md lacks {missing}: run {docs_reference.COMMAND}"


@pytest.mark.parametrize("page", list(docs_reference.PAGES))
def test_reference_page_is_current(page: str) -> None:
    committed = DOCS / "reference" / page
    assert committed.exists(), f"{committed} is missing: run {docs_reference.COMMAND}"
    fresh = docs_reference.render([page])[page]
    assert committed.read_text(encoding="utf-8") == fresh, (
        f"docs/reference/{page} is stale: run `{docs_reference.COMMAND}` and commit the result"
    )


def _shortest(rows: Iterable[ScoredItem], params: SelectParams) -> Iterator[Pick]:
    """Shortest: per instruction, the candidate with the fewest response tokens."""
    for row in rows:
        i = min(range(len(row.scores)), key=lambda c: (row.scores[c]["tokens"], c))
        yield Pick(row.item, i, float(row.scores[i]["tokens"]))


SHORTEST = StrategySpec(
    name="shortest",
    summary="Shortest: per instruction, the candidate with the fewest response tokens.",
    needs=("unconditioned",),
    per_instruction=True,
    streams=True,
    params=("k",),
    accumulate=streamed(_shortest),
    texts=False,
    columns=None,
)


def test_a_new_strategy_is_in_the_generated_strategy_page(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = copy.deepcopy(strategies.STRATEGIES)
    registry.register("shortest", SHORTEST)
    monkeypatch.setattr(strategies, "STRATEGIES", registry)
    page = docs_reference.strategies_page()
    (row,) = [line for line in page.splitlines() if line.startswith("| `shortest` |")]
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[1] == "Shortest: per instruction, the candidate with the fewest response tokens."
    assert cells[2:5] == ["`unconditioned`", "yes", "yes"]
    # and the committed page, generated from the real registry, does not have it: the check would fail
    assert "`shortest`" not in (DOCS / "reference" / "strategies.md").read_text()


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(site.parent)},
    )


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """No broken link or anchor, no page left out of the nav (mkdocs.yml's validation, in strict mode)."""
    proc = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = tmp_path / "site"
    for page in DOCS.rglob("*.md"):
        stem = page.relative_to(DOCS).with_suffix("")
        built = site / "index.html" if stem == Path("index") else site / stem / "index.html"
        assert built.exists(), f"{page} was not built"


def test_the_strict_build_fails_on_a_broken_link_and_an_orphan_page(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + "\n[a setting](reference/settings.md#grape_no_such_setting)\n")
    proc = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    assert "orphan.md" in proc.stderr and "grape_no_such_setting" in proc.stderr
