"""Debian packages some tests need (Chromium, docker-compose), installed by the tests themselves.

CI runs as root on a Debian machine from a fresh clone: a package that is missing is installed with
apt-get (one `apt-get update` per session first). Where that is impossible (not root, no apt-get) the
test is skipped with the command to run; when apt-get itself fails, the test fails with its output.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_updated = False


def ensure_binary(binary: str, package: str, timeout: float = 600) -> str:
    """The path of `binary`, installing Debian's `package` first if it is not on PATH."""
    found = shutil.which(binary)
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(f"{binary} is missing and cannot be installed here: run `apt-get install -y {package}` as root")
    global _updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = ([] if _updated else [["apt-get", "update"]]) + [
        ["apt-get", "install", "-y", "--no-install-recommends", package]
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        if cmd[1] == "update":
            _updated = True
    found = shutil.which(binary)
    if not found:
        pytest.fail(f"installed {package} but {binary} is still not on PATH")
    return found
