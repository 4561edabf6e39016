"""The evaluation consumer: take an evaluation from the Redis queue, run lm-eval on it in a child process, report.

One evaluation at a time per evaluator (it owns its device). Claiming, the heartbeat (TTL
`GRAPE_EVALUATOR_HEARTBEAT_S`) and reaping the evaluations of dead evaluators are the shared consumer's
(grape.store.consumer, over grape.store.jobqueue.EVALUATIONS); this module is what an evaluator does with one.

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

from grape import lifeline
from grape.evaluations import EvalSpec, EvalState
from grape.keys import Keys
from grape.settings import Settings
from grape.store import eval_tasks
from grape.store.consumer import QueueConsumer
from grape.store.errors import shown
from grape.store.io import run
from grape.store.jobqueue import CANCEL, EVALUATIONS, REQUEUE

log = logging.getLogger(__name__)

PROGRESS = re.compile(r"(Running \w+ requests):\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NOISE = re.compile(r"^\s*(\w[\w ]*:)?\s*\d+%\|")  # other progress bars (loading weights, tokenizing...)
LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")  # evaluator.run's log format
TAIL_LINES = 12
POLL_S = 0.5


class EvaluatorLoop(QueueConsumer):
    queue = EVALUATIONS

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        settings: Settings,
        *,
        name: str | None = None,
        block_s: float = 2.0,
    ) -> None:
        super().__init__(client, keys, settings, name=name, block_s=block_s)
        self.task_dir = settings.eval_task_dir.resolve() if settings.eval_task_dir else None
        self.tasks: frozenset[str] = frozenset()
        self.offer: Any = None  # evaluator.harness.Offer, once load_tasks ran

    def run(self, *, max_evals: int | None = None, idle_exit_s: float | None = None) -> int:
        """Take evaluations until stopped (or `max_evals` ran, or idle `idle_exit_s`). Returns how many ran."""
        return self.consume(max_count=max_evals, idle_exit_s=idle_exit_s)

    # stop() is the base's: no Redis call there (a signal handler must not touch a connection the
    # interrupted code may hold); `_supervise` sees the stop and hands the running evaluation back.

    def load_tasks(self) -> None:
        """The tasks this evaluator offers: the operator's GRAPE_EVAL_TASKS (default: only GRAPE_EVAL_TASK_DIR's),
        GRAPE_MAX_EVAL_SUBTASKS and GRAPE_EVAL_UNSAFE_CODE_TASKS decide; nothing of a request does."""
        from evaluator.harness import offer

        t0 = time.monotonic()
        s = self.settings
        self.offer = offer(
            self.task_dir,
            patterns=s.eval_task_patterns(),
            unsafe_patterns=s.eval_unsafe_code_patterns(),
            max_subtasks=s.max_eval_subtasks,
            cache_dir=s.cache_dir,
        )
        self.tasks = frozenset(self.offer.offered)
        log.info(
            "evaluator %s: %d lm-eval tasks offered, %d allowed but refused (%.1f s)",
            self.name,
            len(self.tasks),
            len(self.offer.refused),
            time.monotonic() - t0,
        )

    def _publish(self, *, if_lost: bool = False) -> None:
        publish = eval_tasks.publish_if_lost if if_lost else eval_tasks.publish
        publish(self.r, self.keys, self.tasks, self.offer.local, self.offer.refused)

    def prepare(self) -> None:
        if self.offer is None:
            self.load_tasks()
        self._publish()  # for the gateway's check at creation

    def heartbeat_info(self) -> dict[str, Any]:
        self._publish(if_lost=True)
        return {
            "evaluation": self.current,
            "backend": self.settings.eval_backend,
            "device": self.settings.eval_device,
            "task_dir": str(self.task_dir) if self.task_dir else None,
            "tasks": len(self.tasks),
        }

    def work(self, eval_id: str, spec_json: bytes) -> None:
        self._run(eval_id, EvalSpec.model_validate_json(spec_json))

    def command(self, spec: EvalSpec, spec_file: Path, out_file: Path) -> list[str]:
        """The command line of an evaluation's lm-eval process."""
        s = self.settings
        cmd = [sys.executable, "-m", "evaluator.run", str(spec_file), str(out_file)]
        cmd += ["--backend", s.eval_backend, "--device", s.eval_device, "--dtype", s.eval_dtype]
        cmd += ["--cache-dir", str(s.cache_dir)]
        cmd += ["--trust-remote-code"] if s.trusts_remote_code(spec.base_model) else []
        # only for tasks the operator allowed to run model-generated code (GRAPE_EVAL_UNSAFE_CODE_TASKS)
        cmd += ["--confirm-run-unsafe-code"] if self.offer and set(spec.tasks) & self.offer.unsafe else []
        return cmd + (["--task-dir", str(self.task_dir)] if self.task_dir else [])

    def _run(self, eval_id: str, spec: EvalSpec) -> None:
        unknown = [t for t in spec.tasks if t not in self.tasks]
        if unknown:  # defence in depth: the gateway checked its own GRAPE_EVAL_TASKS; this is the evaluator's
            where = f"GRAPE_EVAL_TASK_DIR {self.task_dir}" if self.task_dir else "no GRAPE_EVAL_TASK_DIR"
            allowed = self.settings.eval_tasks or f"unset: only the tasks of {where}"
            why = "; ".join(
                f"{shown(t)}: {self.offer.refused[t]}" for t in unknown if self.offer and t in self.offer.refused
            )
            error = (
                f"task {', '.join(shown(t) for t in unknown)} is not offered by evaluator {self.name} "
                f"(GRAPE_EVAL_TASKS: {allowed})" + (f"; {why}" if why else "")
            )
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
            EVALUATIONS.release(self.r, self.keys, eval_id, self.name)
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
        env = lifeline.child_env({**os.environ, "PYTHONPATH": path, "TQDM_MININTERVAL": "1"})
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        assert proc.stdout is not None
        reader = threading.Thread(target=self._pump, args=(eval_id, proc.stdout, tail), daemon=True)
        reader.start()
        stop = ""
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                flag, held = run(self.r, EVALUATIONS.watch(self.keys, eval_id, self.name))
                if flag is not None:
                    stop = CANCEL if flag == CANCEL else REQUEUE
                elif self._stop.is_set():
                    stop = REQUEUE
                elif not held:
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
                            self._set(eval_id, done_requests=done, total_requests=total, progress_at=time.time())
                        continue
                    if NOISE.search(line):
                        continue
                    tail.append(line[:500])
                    level = lv.group(1).lower() if (lv := LEVEL.match(line)) else "output"
                    self._log(eval_id, line[:2000], level)
                except redis.RedisError as exc:
                    log.warning("evaluation %s: could not record output: %s", eval_id, exc)
