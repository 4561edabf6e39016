"""The job consumer: take a training job from the Redis queue, materialize its selected set, train, report.

One job at a time per trainer (a trainer owns its GPUs). The queue is a list: BLMOVE takes the oldest id
into this trainer's claimed list and `START_LUA` marks it running, so a job is always either queued or
held by exactly one trainer. A heartbeat key with a TTL says the trainer is alive; a background thread
refreshes it and reaps the jobs of trainers whose heartbeat is gone (`REAP_LUA`: failed, or queued again
to resume when the job asked for it). The gateway does the same when it reads a running job, so a job
is never left "running" after its trainer died, even when no other trainer is up.

Launchers: `inline` trains in this process (CPU, tests, one GPU); `process` starts `python -m trainer.sft`
per job (a crash or a leak dies with the job); `accelerate` starts `accelerate launch --config_file CFG
-m trainer.sft` (multi-GPU: one of TRL's shipped configs by name, e.g. `zero3`, or a path).

On SIGTERM the trainer stops claiming and hands its running job back: the job saves a checkpoint after its
current step and is queued again to resume (another trainer, or this one restarted, picks it up).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Literal

import orjson
import redis

from grape.experiments import write_stored_selection
from grape.jobs import (
    CANCEL,
    FINISH_LUA,
    LOG_MAXLEN,
    REAP_LUA,
    REQUEUE,
    START_LUA,
    JobSpec,
    JobState,
    dead_trainer_reason,
    log_fields,
)
from grape.keys import Keys, is_job_id
from grape.selection_io import write_selection
from grape.settings import Settings
from grape.strategies import SelectParams
from trainer.context import OUTCOME_FILE, Outcome, Stop, TrainContext, checkpoint_dirs

log = logging.getLogger(__name__)

Launcher = Literal["inline", "process", "accelerate"]
DELETED_KEEP_S = 86_400
"""How long a deleted job's id stays in `Keys.jobs_deleted` for trainers to remove its directory."""
SELECTION_FILE = "selection.jsonl"
TRAIN_LOG_FILE = "train.log"


class JobError(RuntimeError):
    """A job that cannot run as asked; the message is the job's error."""


def accelerate_config_path(name_or_path: str) -> Path:
    """A user's accelerate config file, or one of TRL's shipped configs by name (zero3, fsdp2, multi_gpu...)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        if not p.exists():
            raise JobError(f"accelerate config {p} not found")
        return p
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise JobError("TRL is not installed: pip install 'grape-select[train]'")
    shipped = Path(next(iter(spec.submodule_search_locations))) / "accelerate_configs"
    cfg = shipped / f"{name_or_path}.yaml"
    if not cfg.exists():
        names = sorted(x.stem for x in shipped.glob("*.yaml"))
        raise JobError(f"no accelerate config {name_or_path!r}; TRL ships {', '.join(names)} (or give a file)")
    return cfg


class TrainerLoop:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        settings: Settings,
        *,
        name: str | None = None,
        launcher: Launcher = "inline",
        accelerate_config: str | None = None,
        num_processes: int | None = None,
        block_s: float = 2.0,
    ) -> None:
        self.r = client
        self.keys = keys
        self.settings = settings
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.launcher = launcher
        self.accelerate_config = accelerate_config
        self.num_processes = num_processes
        self.block_s = block_s
        self.ttl = settings.trainer_heartbeat_s
        self.jobs_done = 0
        self.current: str | None = None
        self._stop = threading.Event()
        self._start = client.register_script(START_LUA)
        self._finish = client.register_script(FINISH_LUA)
        self._reap = client.register_script(REAP_LUA)
        if launcher == "accelerate":
            accelerate_config_path(accelerate_config or "multi_gpu")  # fail at start, not per job

    # lifecycle -----------------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        """Stop claiming; a running job saves a checkpoint after its current step and is queued again."""
        if not self._stop.is_set():
            held = f"; handing back job {self.current} after its current step" if self.current else ""
            log.info("trainer %s: stopping%s", self.name, held)
        self._stop.set()
        job = self.current
        if job is not None:
            try:
                self.r.set(self.keys.job_cancel(job), REQUEUE, nx=True)  # an asked cancel stays a cancel
            except redis.RedisError as exc:
                log.warning("could not hand back job %s: %s", job, exc)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, *, max_jobs: int | None = None, idle_exit_s: float | None = None) -> int:
        """Take jobs until stopped (or `max_jobs` ran, or the queue was empty `idle_exit_s`). Returns jobs run."""
        self.heartbeat()
        keeper = threading.Thread(target=self._keep_alive, name="trainer-heartbeat", daemon=True)
        keeper.start()
        idle_since = time.monotonic()
        log.info("trainer %s: waiting for jobs on %s (launcher %s)", self.name, self.keys.job_queue(), self.launcher)
        try:
            while not self._stop.is_set():
                if max_jobs is not None and self.jobs_done >= max_jobs:
                    break
                raw = self.r.blmove(
                    self.keys.job_queue(), self.keys.job_claimed(self.name), self.block_s, "RIGHT", "LEFT"
                )
                if raw is None:
                    if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    continue
                self.run_job(raw.decode() if isinstance(raw, bytes) else raw)
                idle_since = time.monotonic()
        finally:
            self._stop.set()
            keeper.join(timeout=5)
            self.r.delete(self.keys.trainer(self.name))
        log.info("trainer %s: stopped after %d job(s)", self.name, self.jobs_done)
        return self.jobs_done

    # heartbeat and reaping ------------------------------------------------------------------------
    def heartbeat(self) -> None:
        info = {"name": self.name, "pid": os.getpid(), "job": self.current, "launcher": self.launcher}
        info["heartbeat"] = time.time()
        self.r.set(self.keys.trainer(self.name), orjson.dumps(info), ex=max(1, int(self.ttl)))

    def _keep_alive(self) -> None:
        while not self._stop.wait(max(0.5, self.ttl / 3)):
            try:
                self.heartbeat()
                self.reap_dead()
                self.remove_deleted()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def remove_deleted(self) -> list[str]:
        """Remove the directories of deleted jobs (DELETE /v1/training-jobs/{id}) from this trainer's train
        dir. Every trainer does it for its own disk; an id stays listed for DELETED_KEEP_S. Returns removed ids."""
        key = self.keys.jobs_deleted()
        self.r.zremrangebyscore(key, "-inf", time.time() - DELETED_KEEP_S)
        root = self.settings.training_dir().resolve()
        removed = []
        for raw in self.r.zrange(key, 0, 9999):
            job_id = raw.decode() if isinstance(raw, bytes) else raw
            if not is_job_id(job_id) or job_id == self.current:
                continue
            path = root / job_id
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(job_id)
                log.info("trainer %s: removed %s of deleted job %s", self.name, path, job_id)
        return removed

    def reap_dead(self) -> dict[str, str]:
        """Jobs held by trainers whose heartbeat is gone: failed, or queued again. Returns job id -> outcome."""
        out: dict[str, str] = {}
        prefix = self.keys.job_claimed("")
        for key in self.r.scan_iter(match=self.keys.job_claimed_pattern(), count=200):
            trainer = (key.decode() if isinstance(key, bytes) else key)[len(prefix) :]
            if trainer == self.name or self.r.exists(self.keys.trainer(trainer)):
                continue
            for raw in self.r.lrange(key, 0, -1):
                job_id = raw.decode() if isinstance(raw, bytes) else raw
                step = self.r.hget(self.keys.job(job_id), "step")
                res = self._reap(
                    keys=[
                        self.keys.trainer(trainer),
                        key,
                        self.keys.job(job_id),
                        self.keys.job_log(job_id),
                        self.keys.job_queue(),
                        self.keys.job_cancel(job_id),
                    ],
                    args=[job_id, trainer, f"{time.time():.3f}", dead_trainer_reason(trainer, step and step.decode())],
                )
                out[job_id] = res.decode() if isinstance(res, bytes) else res
                log.warning("trainer %s: reaped job %s of dead trainer %s: %s", self.name, job_id, trainer, out[job_id])
        return out

    # one job -------------------------------------------------------------------------------------
    def _log(self, job_id: str, msg: str, level: str = "info", **data: Any) -> None:
        self.r.xadd(self.keys.job_log(job_id), log_fields(msg, level, **data), maxlen=LOG_MAXLEN)

    def _end(self, job_id: str, state: JobState, message: str, *, error: str = "", level: str = "info") -> bool:
        done = self._finish(
            keys=[
                self.keys.job_claimed(self.name),
                self.keys.job(job_id),
                self.keys.job_log(job_id),
                self.keys.job_cancel(job_id),
                self.keys.job_queue(),
            ],
            args=[job_id, self.name, state.value, f"{time.time():.3f}", error, message, level],
        )
        return bool(done)

    def output_dir(self, job_id: str) -> Path:
        """The job's own directory, GRAPE_TRAIN_DIR/<job id>: nothing in a request chooses it, and ids are
        the gateway's (`job-` and 12 hex digits), so two jobs never share one."""
        if not is_job_id(job_id):
            raise JobError(f"training job id {job_id!r} is not one the gateway makes (job-<12 hex digits>)")
        return self.settings.training_dir().resolve() / job_id

    def run_job(self, job_id: str) -> None:
        raw = self._start(
            keys=[self.keys.job_claimed(self.name), self.keys.job(job_id), self.keys.job_log(job_id)],
            args=[job_id, self.name, f"{time.time():.3f}"],
        )
        if raw is None:
            log.info("job %s was cancelled or removed before it started", job_id)
            return
        self.current = job_id
        self.heartbeat()
        try:
            self._run(job_id, JobSpec.model_validate_json(raw))
        except Exception as exc:  # noqa: BLE001 - any error fails the job with its reason, the trainer goes on
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, JobError) else str(exc)
            log.exception("job %s failed", job_id)
            self._log(job_id, "traceback", "error", traceback=traceback.format_exc(limit=20))
            self._end(job_id, JobState.failed, f"failed: {error}", error=error, level="error")
        finally:
            self.current = None
            self.jobs_done += 1

    def _run(self, job_id: str, spec: JobSpec) -> None:
        resume = self.r.hget(self.keys.job(job_id), "resume") == b"1"
        out = self.output_dir(job_id)
        if not resume and checkpoint_dirs(out):
            raise JobError(f"{out} already holds checkpoints of an earlier run of this job: resume the job instead")
        out.mkdir(parents=True, exist_ok=True)
        self.r.hset(self.keys.job(job_id), mapping={"output_dir": str(out), "resume": ""})
        data = out / SELECTION_FILE
        if resume and data.exists():  # a resumed run trains on exactly the records of the first run
            with open(data, "rb") as f:
                n = sum(1 for line in f if line.strip())
            self._log(job_id, f"resuming: reusing the selected set ({n} records) in {data}")
        elif spec.selection_ref:  # an experiment arm: exactly the selection the experiment stored
            n = write_stored_selection(self.r, self.keys, spec.selection_ref, data)
            self._log(job_id, f"experiment selection {spec.selection_ref}: {n} records in {data}")
        else:
            params = SelectParams(k=spec.k, reduce=spec.reduce, n=spec.n, tau=spec.tau, seed=spec.seed)
            n = write_selection(self.r, self.keys, spec.dataset_id, spec.strategy, params, data)
            self._log(job_id, f"selected set materialized: {n} records ({spec.strategy}, k={spec.k}) in {data}")
        self.r.hset(self.keys.job(job_id), "train_records", n)
        if n == 0:
            raise JobError(f"the selection of dataset {spec.dataset_id} ({spec.strategy}) is empty: nothing to train")
        flag = self.r.get(self.keys.job_cancel(job_id))
        if flag is not None and flag.decode() == CANCEL:
            self._end(job_id, JobState.cancelled, "cancelled before training started")
            return
        if flag is not None and flag.decode() == REQUEUE:
            self._end(job_id, JobState.queued, f"handed back before training started (trainer {self.name} stopped)")
            return
        ctx = TrainContext(job_id, spec, data, out, resume=resume, trainer_name=self.name, settings=self.settings)
        outcome = self._train(ctx)
        ckpts = checkpoint_dirs(out)
        self.r.hset(self.keys.job(job_id), "checkpoints", orjson.dumps(ckpts).decode())
        if outcome.stop is Stop.none:
            self.r.hset(self.keys.job(job_id), "model_path", outcome.model_path or "")
            self._end(
                job_id,
                JobState.succeeded,
                f"succeeded after {outcome.steps} steps; model in {outcome.model_path}",
            )
        elif outcome.stop is Stop.cancel:
            where = ckpts[-1] if ckpts else "none"
            self._end(job_id, JobState.cancelled, f"cancelled at step {outcome.steps}; checkpoint {where}")
        elif outcome.stop is Stop.requeue:
            self._end(job_id, JobState.queued, f"handed back at step {outcome.steps} (trainer {self.name} stopped)")
        else:
            self._end(job_id, JobState.failed, "stopped: the job is no longer held by this trainer")
            log.warning("job %s was taken from trainer %s while it ran; stopped", job_id, self.name)

    def _train(self, ctx: TrainContext) -> Outcome:
        if self.launcher == "inline":
            from trainer.sft import train  # torch, transformers and TRL: only in the process that trains

            return train(ctx, self.r, self.keys)
        return self._train_subprocess(ctx)

    def command(self, ctx: TrainContext) -> list[str]:
        """The command line of a job's training process."""
        job_args = ["--job", ctx.job_id, "--trainer", self.name, "--data", str(ctx.data_path)]
        job_args += ["--output-dir", str(ctx.output_dir)] + (["--resume"] if ctx.resume else [])
        if self.launcher == "process":
            return [sys.executable, "-m", "trainer.sft", *job_args]
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        cmd += ["--config_file", str(accelerate_config_path(self.accelerate_config or "multi_gpu"))]
        if self.num_processes:
            cmd += ["--num_processes", str(self.num_processes)]
        return [*cmd, "-m", "trainer.sft", *job_args]

    def _train_subprocess(self, ctx: TrainContext) -> Outcome:
        outcome_file = ctx.output_dir / OUTCOME_FILE
        outcome_file.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update(
            {
                "REDIS_URL": self.settings.redis_url or env.get("REDIS_URL", ""),
                "GRAPE_KEY_PREFIX": self.keys.prefix,
                "GRAPE_CACHE_DIR": str(self.settings.cache_dir),
                # the operator's training settings, as this trainer has them (flags included)
                "GRAPE_TRUST_REMOTE_CODE_MODELS": self.settings.trust_remote_code_models,
                "GRAPE_TRAIN_REPORT_TO": self.settings.train_report_to,
                "GRAPE_TRAIN_DATALOADER_WORKERS": str(self.settings.train_dataloader_workers),
            }
        )
        if self.settings.chat_template_dir is not None:
            env["GRAPE_CHAT_TEMPLATE_DIR"] = str(self.settings.chat_template_dir)
        else:
            env.pop("GRAPE_CHAT_TEMPLATE_DIR", None)
        if not env["REDIS_URL"]:
            env.pop("REDIS_URL")
        cmd = self.command(ctx)
        logfile = ctx.output_dir / TRAIN_LOG_FILE
        self._log(ctx.job_id, f"launching: {' '.join(cmd)} (output in {logfile})")
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            code = proc.wait()
        if code != 0 or not outcome_file.exists():
            tail = logfile.read_text(errors="replace").strip().splitlines()[-8:]
            raise JobError(f"training process exited with code {code}: " + " | ".join(tail))
        return Outcome.from_json(outcome_file.read_bytes())
