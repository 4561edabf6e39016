"""Issue 19: a SIGKILLed worker, trainer or evaluator leaves no process behind (grape.lifeline).

Each test starts the real CLI process, waits until the children it is about have started (found in /proc:
the process's descendants, recursively), SIGKILLs it, and asserts every descendant is gone within 10 s
(a zombie counts as gone: it holds no memory). Whatever survives is killed by the test itself."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

from fastapi.testclient import TestClient

from grape.keys import Keys
from grape.lifeline import PARENT_ENV
from grape.models import resolve_model
from service.app import create_app
from tests.conftest import MODEL, ROOT, create, load_pool, wait_done
from tests.test_evaluations import LIMIT, TASK, start_evaluator, wait_alive, wait_eval
from tests.test_training import LORA
from workers.backends import BackendConfig, load_backend
from workers.loop import Worker

GONE_WITHIN_S = 10.0

Proc = tuple[int, int]
"""(pid, start time in clock ticks): a pid the kernel reused is not the process we recorded."""


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...]; None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def descendants(pid: int) -> dict[Proc, str]:
    """Every live process below `pid` (children, theirs, ...): {(pid, start time): command line}."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children[int(st[1])].append(int(entry.name))
    found: dict[Proc, str] = {}
    todo = list(children[pid])
    while todo:
        child = todo.pop()
        st = _stat(child)
        if st is None or st[0] == "Z":
            continue
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found[(child, int(st[19]))] = cmd
        todo += children[child]
    return found


def alive(proc: Proc) -> bool:
    st = _stat(proc[0])
    return st is not None and st[0] != "Z" and int(st[19]) == proc[1]


def kill_and_watch(parent: subprocess.Popen, seen: dict[Proc, str]) -> list[str]:
    """SIGKILL `parent`; the command lines of the recorded descendants still alive after GONE_WITHIN_S."""
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := [cmd for p, cmd in seen.items() if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@contextlib.contextmanager
def reaped(seen: dict[Proc, str], parent: subprocess.Popen | None = None) -> Iterator[None]:
    """Whatever happens in the test, no process it started outlives it."""
    try:
        yield
    finally:
        if parent is not None and parent.poll() is None:
            seen.update(descendants(parent.pid))
            parent.kill()
            parent.wait()
        for proc in seen:
            if alive(proc):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc[0], signal.SIGKILL)


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"exited before {what}: {log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def cli_env(redis_url: str, keys: Keys, **extra: str) -> dict[str, str]:
    env = {**os.environ, "REDIS_URL": redis_url, "GRAPE_KEY_PREFIX": keys.prefix, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop(PARENT_ENV, None)  # started from the test, not as anyone's guarded child
    return env


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:  # the child has its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)


def test_a_killed_vllm_worker_leaves_no_engine_process(redis_url, keys, rclient, tmp_path) -> None:
    """vLLM's EngineCore and Worker processes (~4 GB here) die with a SIGKILLed `grape worker`."""
    log = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "grape.cli", "worker", "--backend", "vllm", "--model", resolve_model(MODEL)]
    cmd += ["--dtype", "float32", "--max-model-len", "512", "--name", "doomed-vllm"]
    env = cli_env(redis_url, keys, VLLM_CPU_KVCACHE_SPACE="1")
    worker = start(cmd, env, log)
    seen: dict[Proc, str] = {}
    with reaped(seen, worker):

        def engine_up() -> bool:
            seen.update(descendants(worker.pid))
            names = " ".join(seen.values())
            engine = "VLLM::EngineCore" in names and "VLLM::Worker" in names
            return engine and bool(rclient.exists(keys.worker("doomed-vllm")))

        wait_for("engine processes and a heartbeat", engine_up, worker, log, timeout=300)
        engine = {p: cmd for p, cmd in seen.items() if cmd.startswith("VLLM::")}
        time.sleep(2)  # the engine keeps running once armed: the signal is the parent's death, nothing else
        assert all(alive(p) for p in engine), engine
        watched = descendants(worker.pid)
        seen.update(watched)
        left = kill_and_watch(worker, watched)
        assert not left, f"alive {GONE_WITHIN_S:.0f} s after the worker was killed: {left}"


def test_a_killed_trainer_leaves_no_training_process(redis_url, keys, rclient, settings, tmp_path) -> None:
    """The job's training process (its own session) dies with a SIGKILLed `grape trainer`."""
    with TestClient(create_app(settings)) as api:
        ds = create(api)
        items = load_pool(2, max_chars=200, candidates=2, start=10)
        assert api.post(f"/v1/datasets/{ds}/items", json={"items": items}).json()["accepted"] == 2
        null = Worker(rclient, keys, MODEL, load_backend("null", BackendConfig(model=resolve_model(MODEL))))
        null.run(idle_exit_s=1)
        wait_done(api, ds, timeout=30)
        hp = {"max_steps": 5000, "per_device_train_batch_size": 1, "max_length": 96, "save_steps": 5000}
        hp |= {"gradient_checkpointing": False, "bf16": False}
        r = api.post("/v1/training-jobs", json={"dataset_id": ds, "hyperparameters": hp, "lora": LORA})
        assert r.status_code == 201, r.text
        job = r.json()["id"]

        log = tmp_path / "trainer.log"
        cmd = [sys.executable, "-m", "grape.cli", "trainer", "--name", "doomed", "--train-dir", str(tmp_path)]
        trainer = start(cmd, cli_env(redis_url, keys), log)
        seen: dict[Proc, str] = {}
        with reaped(seen, trainer):

            def training() -> bool:
                seen.update(descendants(trainer.pid))
                st = api.get(f"/v1/training-jobs/{job}").json()
                assert st["state"] in ("queued", "running"), st
                return st["step"] >= 1 and any("trainer.sft" in c for c in seen.values())

            wait_for("a training step", training, trainer, log, timeout=300)
            left = kill_and_watch(trainer, seen)
            assert not left, f"alive {GONE_WITHIN_S:.0f} s after the trainer was killed: {left}"


def test_a_killed_evaluator_leaves_no_evaluation_process(redis_url, keys, rclient, settings, tmp_path) -> None:
    """The evaluation's lm-eval process dies with a SIGKILLed `grape evaluator`. (lm-eval's vLLM backend, whose
    engine processes follow the same chain, cannot run here: it asks for the `vllm` distribution by name, and
    this machine has `vllm-cpu`.)"""
    log = tmp_path / "evaluator.log"
    evaluator = start_evaluator(redis_url, keys, "doomed", log, **{PARENT_ENV: ""})
    seen: dict[Proc, str] = {}
    with reaped(seen, evaluator):
        wait_alive(rclient, keys, "doomed", evaluator, log)
        with TestClient(create_app(settings), base_url="http://localhost") as api:
            r = api.post("/v1/evaluations", json={"model": MODEL, "tasks": [TASK], "limit": LIMIT, "batch_size": 1})
            assert r.status_code == 201, r.text
            eval_id = r.json()["id"]
            wait_eval(api, eval_id, ("running",), timeout=60)

            def evaluating() -> bool:
                seen.update(descendants(evaluator.pid))
                state = api.get(f"/v1/evaluations/{eval_id}").json()["state"]
                assert state == "running", api.get(f"/v1/evaluations/{eval_id}/logs").text[-3000:]
                return rclient.hget(keys.evaluations.record(eval_id), "done_requests") is not None

            wait_for("lm-eval scoring requests", evaluating, evaluator, log, timeout=300)
            assert any("evaluator.run" in c for c in seen.values()), seen
            left = kill_and_watch(evaluator, seen)
            assert not left, f"alive {GONE_WITHIN_S:.0f} s after the evaluator was killed: {left}"


# ---- the mechanism itself (grape.lifeline), on small processes -------------------------------------------

SHOW_PDEATHSIG = "import ctypes; s = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(s)); print(s.value)"
"""A command that prints the parent-death signal it runs with (prctl PR_GET_PDEATHSIG)."""


def test_a_command_run_through_the_lifeline_dies_with_the_process_that_asked_only(tmp_path) -> None:
    wrapped = [sys.executable, "-m", "grape.lifeline", "--", sys.executable, "-c", SHOW_PDEATHSIG]
    env = cli_env("", Keys("unused"))

    def run(parent: str) -> subprocess.CompletedProcess:
        return subprocess.run(wrapped, env={**env, PARENT_ENV: parent}, capture_output=True, text=True, cwd=ROOT)

    mine = run(str(os.getpid()))
    assert (mine.returncode, mine.stdout.strip()) == (0, str(int(signal.SIGKILL))), mine.stderr
    stranger = run(str(os.getppid()))  # alive, but not the command's parent: not followed
    assert (stranger.returncode, stranger.stdout.strip()) == (0, "0"), stranger.stderr
    unset = run("")
    assert (unset.returncode, unset.stdout.strip()) == (0, "0"), unset.stderr
    gone = subprocess.Popen(["true"])
    gone.wait()
    late = run(str(gone.pid))  # its parent died before it could arm: it must not run on
    assert late.returncode == 1 and late.stdout == "", late


def test_exec_and_forked_children_die_with_a_guarding_process(tmp_path) -> None:
    """What `accelerate launch` (not grape code) and vLLM's `fork` start method rely on."""
    script = (
        "import multiprocessing, os, subprocess, sys, time\n"
        "from grape import lifeline\n"
        "lifeline.guard_children()\n"
        "subprocess.Popen(lifeline.command(['sleep', '300']), env=lifeline.child_env(dict(os.environ)),"
        " start_new_session=True)\n"
        "multiprocessing.get_context('fork').Process(target=time.sleep, args=(300,)).start()\n"
        "time.sleep(300)\n"
    )
    log = tmp_path / "guard.log"
    parent = start([sys.executable, "-c", script], cli_env("", Keys("unused")), log)
    seen: dict[Proc, str] = {}
    with reaped(seen, parent):

        def both() -> bool:
            seen.update(descendants(parent.pid))
            return len([c for c in seen.values() if c == "sleep 300" or c.startswith(sys.executable)]) >= 2

        wait_for("an exec'ed and a forked child", both, parent, log, timeout=30)
        time.sleep(0.5)
        watched = descendants(parent.pid)
        assert len(watched) >= 2 and all(alive(p) for p in watched), watched
        left = kill_and_watch(parent, watched)
        assert not left, f"alive {GONE_WITHIN_S:.0f} s after their parent was killed: {left}"
