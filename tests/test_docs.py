"""The README documents every setting, and its commands match .ci/run."""

from __future__ import annotations

from grape.settings import Settings
from tests.conftest import ROOT


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = []
    for name, field in Settings.model_fields.items():
        env = "REDIS_URL" if name == "redis_url" else f"GRAPE_{name.upper()}"
        if f"`{env}`" not in readme:
            missing.append(env)
        assert field.description, f"setting {name} has no description"
    assert not missing, f"README configuration table lacks {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = [line for line in ci.splitlines() if line.startswith("python3.11 -m venv")][0]
    assert command in readme
    blocks = readme.split("```bash\n")
    assert blocks[2].startswith(command)  # the second command of the README
    assert "grape demo" in blocks[1].splitlines()[0]
