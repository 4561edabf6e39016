"""The evaluation consumer: take an evaluation from the Redis queue, run lm-eval on it in a child process, report.

One evaluation at a time per evaluator (it owns its device). The protocol is the trainer's (grape.evaluations):
BLMOVE the oldest id into this evaluator's claimed list, `START_LUA` marks it running, `FINISH_LUA` ends it.
A background thread refreshes the heartbeat key (TTL `GRAPE_EVALUATOR_HEARTBEAT_S`) and reaps the evaluations
of evaluators whose heartbeat is gone: queued again to start over, or failed after `max_attempts` runs.

lm-eval runs in `python -m evaluator.run` (a process per evaluation) so that a cancel, or this evaluator
shutting down, can stop it at once: the loop polls the cancel flag while it waits and kills the child. On
SIGTERM the evaluator stops claiming and hands its running evaluation back (queued again, the attempt not
counted). The child's output becomes the evaluation's log stream; lm-eval's progress bars become
`done_requests` / `total_requests`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import orjson
import redis

from grape.evaluations import (
    FINISH_LUA,
    REAP_LUA,
    START_LUA,
    EvalSpec,
    EvalState,
    dead_evaluator_reason,
    log_fields,
)
from grape.jobs import CANCEL, LOG_MAXLEN, REQUEUE
from grape.keys import Keys
from grape.redis_client import as_str
from grape.settings import Settings

log = logging.getLogger(__name__)

PROGRESS = re.compile(r"(Running \w+ requests):\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NOISE = re.compile(r"^\s*(\w[\w ]*:)?\s*\d+%\|")  # other progress bars (loading weights, tokenizing...)
LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")  # evaluator.run's log format
TAIL_LINES = 12
POLL_S = 0.5


class EvaluatorLoop:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        settings: Settings,
        *,
        name: str | None = None,
        block_s: float = 2.0,
    ) -> None:
        self.r = client
        self.keys = keys
        self.settings = settings
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.task_dir = settings.eval_task_dir.resolve() if settings.eval_task_dir else None
        self.block_s = block_s
        self.ttl = settings.evaluator_heartbeat_s
        self.evals_done = 0
        self.current: str | None = None
        self.tasks: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._start = client.register_script(START_LUA)
        self._finish = client.register_script(FINISH_LUA)
        self._reap = client.register_script(REAP_LUA)

    # lifecycle -----------------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        """Stop claiming; a running evaluation is stopped and handed back (no Redis call here: a signal
        handler must not touch a connection the interrupted code may hold)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def load_tasks(self) -> None:
        from evaluator.harness import known_tasks

        t0 = time.monotonic()
        self.tasks = frozenset(known_tasks(self.task_dir, self.settings.cache_dir))
        log.info("evaluator %s: %d lm-eval tasks known (%.1f s)", self.name, len(self.tasks), time.monotonic() - t0)

    def publish_tasks(self) -> None:
        """The task names this evaluator can run, for the gateway's check at creation (a union over evaluators)."""
        names = sorted(self.tasks)
        pipe = self.r.pipeline(transaction=False)
        for i in range(0, len(names), 2000):
            pipe.sadd(self.keys.eval_tasks(), *names[i : i + 2000])
        pipe.execute()

    def run(self, *, max_evals: int | None = None, idle_exit_s: float | None = None) -> int:
        """Take evaluations until stopped (or `max_evals` ran, or idle `idle_exit_s`). Returns how many ran."""
        if not self.tasks:
            self.load_tasks()
        self.publish_tasks()
        self.heartbeat()
        keeper = threading.Thread(target=self._keep_alive, name="evaluator-heartbeat", daemon=True)
        keeper.start()
        idle_since = time.monotonic()
        log.info("evaluator %s: waiting for evaluations on %s", self.name, self.keys.eval_queue())
        try:
            while not self._stop.is_set():
                if max_evals is not None and self.evals_done >= max_evals:
                    break
                raw = self.r.blmove(
                    self.keys.eval_queue(), self.keys.eval_claimed(self.name), self.block_s, "RIGHT", "LEFT"
                )
                if raw is None:
                    if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    continue
                self.run_evaluation(as_str(raw))
                idle_since = time.monotonic()
        finally:
            self._stop.set()
            keeper.join(timeout=5)
            pipe = self.r.pipeline(transaction=False)
            pipe.delete(self.keys.evaluator(self.name))
            pipe.zrem(self.keys.evaluators(), self.name)
            pipe.execute()
        log.info("evaluator %s: stopped after %d evaluation(s)", self.name, self.evals_done)
        return self.evals_done

    # heartbeat and reaping ------------------------------------------------------------------------
    def heartbeat(self) -> None:
        info = {
            "name": self.name,
            "pid": os.getpid(),
            "evaluation": self.current,
            "backend": self.settings.eval_backend,
            "device": self.settings.eval_device,
            "task_dir": str(self.task_dir) if self.task_dir else None,
            "tasks": len(self.tasks),
            "heartbeat": time.time(),
        }
        if not self.r.exists(self.keys.eval_tasks()):  # Redis lost it (a restart without persistence)
            self.publish_tasks()
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.keys.evaluator(self.name), orjson.dumps(info), ex=max(1, int(self.ttl)))
        pipe.zadd(self.keys.evaluators(), {self.name: info["heartbeat"]})
        pipe.execute()

    def _keep_alive(self) -> None:
        while not self._stop.wait(max(0.5, self.ttl / 3)):
            try:
                self.heartbeat()
                self.reap_dead()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def reap_dead(self) -> dict[str, str]:
        """Evaluations held by evaluators whose heartbeat is gone: queued again, or failed. id -> outcome."""
        out: dict[str, str] = {}
        prefix = self.keys.eval_claimed("")
        for key in self.r.scan_iter(match=self.keys.eval_claimed_pattern(), count=200):
            other = as_str(key)[len(prefix) :]
            if other == self.name or self.r.exists(self.keys.evaluator(other)):
                continue
            for raw in self.r.lrange(key, 0, -1):
                eval_id = as_str(raw)
                res = self._reap(
                    keys=[
                        self.keys.evaluator(other),
                        key,
                        self.keys.evaluation(eval_id),
                        self.keys.eval_log(eval_id),
                        self.keys.eval_queue(),
                        self.keys.eval_cancel(eval_id),
                    ],
                    args=[eval_id, other, f"{time.time():.3f}", dead_evaluator_reason(other)],
                )
                out[eval_id] = as_str(res)
                log.warning("evaluator %s: reaped %s of dead evaluator %s: %s", self.name, eval_id, other, out[eval_id])
        return out

    # one evaluation -------------------------------------------------------------------------------
    def _log(self, eval_id: str, msg: str, level: str = "info", **data: Any) -> None:
        self.r.xadd(self.keys.eval_log(eval_id), log_fields(msg, level, **data), maxlen=LOG_MAXLEN)

    def _end(
        self,
        eval_id: str,
        state: EvalState,
        message: str,
        *,
        error: str = "",
        level: str = "info",
        fields: dict[str, Any] | None = None,
    ) -> bool:
        args: list[Any] = [eval_id, self.name, state.value, f"{time.time():.3f}", error, message, level]
        for k, v in (fields or {}).items():
            args += [k, orjson.dumps(v).decode()]
        done = self._finish(
            keys=[
                self.keys.eval_claimed(self.name),
                self.keys.evaluation(eval_id),
                self.keys.eval_log(eval_id),
                self.keys.eval_cancel(eval_id),
                self.keys.eval_queue(),
            ],
            args=args,
        )
        return bool(done)

    def run_evaluation(self, eval_id: str) -> None:
        raw = self._start(
            keys=[self.keys.eval_claimed(self.name), self.keys.evaluation(eval_id), self.keys.eval_log(eval_id)],
            args=[eval_id, self.name, f"{time.time():.3f}"],
        )
        if raw is None:
            log.info("evaluation %s was cancelled or removed before it started", eval_id)
            return
        self.current = eval_id
        self.heartbeat()
        try:
            self._run(eval_id, EvalSpec.model_validate_json(raw))
        except Exception as exc:  # noqa: BLE001 - any error fails the evaluation with its reason; the loop goes on
            log.exception("evaluation %s failed", eval_id)
            error = f"{type(exc).__name__}: {exc}"
            self._end(eval_id, EvalState.failed, f"failed: {error}", error=error, level="error")
        finally:
            self.current = None
            self.evals_done += 1

    def command(self, spec: EvalSpec, spec_file: Path, out_file: Path) -> list[str]:
        """The command line of an evaluation's lm-eval process."""
        s = self.settings
        cmd = [sys.executable, "-m", "evaluator.run", str(spec_file), str(out_file)]
        cmd += ["--backend", s.eval_backend, "--device", s.eval_device, "--dtype", s.eval_dtype]
        cmd += ["--cache-dir", str(s.cache_dir)]
        cmd += ["--trust-remote-code"] if s.trusts_remote_code(spec.base_model) else []
        return cmd + (["--task-dir", str(self.task_dir)] if self.task_dir else [])

    def _run(self, eval_id: str, spec: EvalSpec) -> None:
        unknown = [t for t in spec.tasks if t not in self.tasks]
        if unknown:
            where = f"GRAPE_EVAL_TASK_DIR {self.task_dir}" if self.task_dir else "no GRAPE_EVAL_TASK_DIR"
            error = f"task {', '.join(unknown)} is not known to evaluator {self.name} (lm-eval's tasks, {where})"
            self._end(eval_id, EvalState.failed, f"failed: {error}", error=error, level="error")
            return
        with tempfile.TemporaryDirectory(prefix=f"grape-{eval_id}-") as tmp:
            spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
            spec_file.write_text(spec.model_dump_json())
            cmd = self.command(spec, spec_file, out_file)
            self._log(eval_id, f"running lm-eval: {' '.join(cmd)}")
            stop, code, tail = self._supervise(eval_id, cmd, cwd=self.task_dir or Path(tmp))
            outcome = orjson.loads(out_file.read_bytes()) if out_file.exists() else {}
        if stop == CANCEL:
            self._end(eval_id, EvalState.cancelled, "cancelled: lm-eval stopped")
        elif stop == REQUEUE:
            self._end(eval_id, EvalState.queued, f"handed back: evaluator {self.name} is stopping")
        elif stop == "lost":
            self.r.lrem(self.keys.eval_claimed(self.name), 0, eval_id)
            log.warning("evaluation %s was taken from evaluator %s while it ran; stopped", eval_id, self.name)
        elif "results" in outcome:
            summary = "; ".join(
                f"{task} {m}={v['value']:.4g}" + (f"±{v['stderr']:.2g}" if v["stderr"] is not None else "")
                for task, metrics in outcome["results"].items()
                for m, v in metrics.items()
            )
            self._end(eval_id, EvalState.succeeded, f"succeeded: {summary}", fields=outcome)
        else:
            error = outcome.get("error") or f"lm-eval process exited with code {code}: " + " | ".join(tail)
            self._end(eval_id, EvalState.failed, f"failed: {error}", error=error, level="error")

    def _supervise(self, eval_id: str, cmd: list[str], *, cwd: Path) -> tuple[str, int | None, list[str]]:
        """Run the child to its end, or stop it on cancel / shutdown / loss. (stop reason or "", exit code, tail)."""
        # the child runs this very code whatever its working directory (the task dir): our source root first
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "GRAPE_EVALUATOR_PID": str(os.getpid()), "TQDM_MININTERVAL": "1"}
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        assert proc.stdout is not None
        reader = threading.Thread(target=self._pump, args=(eval_id, proc.stdout, tail), daemon=True)
        reader.start()
        stop = ""
        last_held_check = time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                flag = self.r.get(self.keys.eval_cancel(eval_id))
                if flag is not None:
                    stop = CANCEL if as_str(flag) == CANCEL else REQUEUE
                elif self._stop.is_set():
                    stop = REQUEUE
                elif time.monotonic() - last_held_check > 2:
                    last_held_check = time.monotonic()
                    held = self.r.hmget(self.keys.evaluation(eval_id), "state", "evaluator")
                    if [as_str(x) if x is not None else None for x in held] != [EvalState.running.value, self.name]:
                        stop = "lost"
                if stop:
                    self._kill(proc)
                    break
        finally:
            if proc.poll() is None:
                self._kill(proc)
            reader.join(timeout=10)
        return stop, proc.returncode, list(tail)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _pump(self, eval_id: str, stream: IO[bytes], tail: deque[str]) -> None:
        """The child's output: progress bars to progress fields, other lines to the evaluation's log stream."""
        buf = b""
        last_progress = 0.0
        while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096):
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for raw in lines:
                line = ANSI.sub("", raw.decode(errors="replace")).rstrip()
                if not line:
                    continue
                m = PROGRESS.search(line)
                try:
                    if m:
                        done, total = int(m.group(2)), int(m.group(3))
                        if time.monotonic() - last_progress > 1 or done == total:
                            last_progress = time.monotonic()
                            self.r.hset(
                                self.keys.evaluation(eval_id),
                                mapping={"done_requests": done, "total_requests": total, "progress_at": time.time()},
                            )
                        continue
                    if NOISE.search(line):
                        continue
                    tail.append(line[:500])
                    level = lv.group(1).lower() if (lv := LEVEL.match(line)) else "output"
                    self._log(eval_id, line[:2000], level)
                except redis.RedisError as exc:
                    log.warning("evaluation %s: could not record output: %s", eval_id, exc)
