"""Child processes that die with the process that started them, even when it is SIGKILLed (Linux).

A worker, trainer or evaluator killed by the OOM killer or `kill -9` runs no cleanup: its vLLM engine
processes, training process or lm-eval process would live on as orphans, holding the memory (on a GPU, the
GPU memory) its replacement needs. Linux's parent-death signal (prctl PR_SET_PDEATHSIG) makes the kernel
SIGKILL a child when its parent goes; it survives exec, so it also covers a command we do not own
(`accelerate launch`) when set by `python -m grape.lifeline -- CMD...` just before the exec.

The chain is passed down in one environment variable, GRAPE_PARENT_PID: a process that wants its children
to die with it sets it to its own pid (`guard_children`); a child that finds it set to its parent's pid arms
the signal (`hold_on`) and sets it to its own pid for its own children in turn. vLLM starts its engine
processes itself; the `vllm.general_plugins` entry point `grape_lifeline` (pyproject.toml), which vLLM runs
in every process it starts, calls `hold_on` there. Without the variable nothing happens, so a vLLM server
that happens to run beside grape is untouched.

The kernel sends the signal when the *thread* that started the child ends, not the process: start guarded
children from a thread that outlives them (the main thread, or the thread that waits for the child).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

PARENT_ENV = "GRAPE_PARENT_PID"
VLLM_PLUGIN = "grape_lifeline"
PR_SET_PDEATHSIG = 1

_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: callers' own cleanup is all there is
    _prctl = None
_fork_hook_installed = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def hold_on() -> bool:
    """In a child: when GRAPE_PARENT_PID names our parent, be SIGKILLed when it dies; exit now if it died
    already (before the signal was armed). Then name ourselves for our own children. True when armed.
    A process that is not that pid's child (started some other way, with the variable inherited) is left
    alone."""
    value = os.environ.get(PARENT_ENV, "")
    if not value.isdigit() or _prctl is None:
        return False
    parent, me = int(value), os.getpid()
    if parent == me:  # the process that asked (or a grape child exec'ed by `python -m grape.lifeline`)
        return False
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        if not _alive(parent):  # it died between starting us and the prctl: the signal will never come
            os._exit(1)
        _prctl(PR_SET_PDEATHSIG, 0)  # a live process that is not our parent: not ours to follow
        return False
    os.environ[PARENT_ENV] = str(me)
    return True


def _forked() -> None:
    with contextlib.suppress(Exception):  # never break a fork over this
        hold_on()


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child that is to die with this process (it, or the grape code it runs, calls `hold_on`)."""
    out = {**env, PARENT_ENV: str(os.getpid())}
    plugins = out.get("VLLM_PLUGINS")
    if plugins is not None and VLLM_PLUGIN not in plugins.split(","):  # the operator's vLLM allow-list
        out["VLLM_PLUGINS"] = ",".join(p for p in (plugins, VLLM_PLUGIN) if p)
    return out


def guard_children() -> None:
    """From now on, children started by this process (spawned, exec'ed or forked by multiprocessing) that call
    `hold_on` die with it. The fork hook covers vLLM's `fork` start method, where a child runs no plugin."""
    global _fork_hook_installed
    for name, value in child_env(dict(os.environ)).items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    if not _fork_hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forked)
        _fork_hook_installed = True


def vllm_plugin() -> None:
    """vLLM's `vllm.general_plugins` entry point: runs in every process vLLM starts (and in the one that
    builds the engine). It must never raise: vLLM calls it unguarded."""
    with contextlib.suppress(Exception):
        if hold_on() or os.environ.get(PARENT_ENV) == str(os.getpid()):
            guard_children()  # an engine process: its own workers follow it in turn


def command(cmd: list[str]) -> list[str]:
    """`cmd` run through `python -m grape.lifeline`: armed to die with this process before it execs, so it
    need not be grape code. Start it with `child_env`."""
    return [sys.executable, "-m", "grape.lifeline", "--", *cmd]


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--" or len(argv) < 2:
        print("usage: python -m grape.lifeline -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    hold_on()
    cmd = argv[1:]
    os.execvp(cmd[0], cmd)  # the parent-death signal survives exec (for a binary that is not set-user-ID)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
