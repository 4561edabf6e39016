"""The job consumer: take a training job from the Redis queue, materialize its selected set, train, report.

One job at a time per trainer (a trainer owns its GPUs). Claiming, the heartbeat and reaping the jobs of
dead trainers are the shared consumer's (grape.store.consumer, over grape.store.jobqueue.TRAINING); this
module is what a trainer does with a job. The gateway reaps too when it reads a running job, so a job is
never left "running" after its trainer died, even when no other trainer is up.

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
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Literal

import orjson
import redis

from grape import lifeline
from grape.experiments import write_stored_selection
from grape.jobs import JobSpec, JobState, kept_checkpoints
from grape.keys import Keys, is_job_id
from grape.settings import Settings
from grape.store.consumer import QueueConsumer
from grape.store.datasets import write_selection
from grape.store.io import run
from grape.store.jobqueue import CANCEL, REQUEUE, TRAINING
from trainer.context import OUTCOME_FILE, Outcome, Stop, TrainContext, checkpoint_dirs

log = logging.getLogger(__name__)

Launcher = Literal["inline", "process", "accelerate"]
DELETED_KEEP_S = 86_400
"""How long a deleted job's id stays in `Keys.training.deleted()` for trainers to remove its directory."""
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


class TrainerLoop(QueueConsumer):
    queue = TRAINING

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
        super().__init__(client, keys, settings, name=name, block_s=block_s)
        self.launcher = launcher
        self.accelerate_config = accelerate_config
        self.num_processes = num_processes
        if launcher == "accelerate":
            accelerate_config_path(accelerate_config or "multi_gpu")  # fail at start, not per job

    def run(self, *, max_jobs: int | None = None, idle_exit_s: float | None = None) -> int:
        """Take jobs until stopped (or `max_jobs` ran, or the queue was empty `idle_exit_s`). Returns jobs run."""
        return self.consume(max_count=max_jobs, idle_exit_s=idle_exit_s)

    def stop(self, *_: Any) -> None:
        """Stop claiming; a running job saves a checkpoint after its current step and is queued again."""
        if not self._stop.is_set():
            held = f"; handing back job {self.current} after its current step" if self.current else ""
            log.info("trainer %s: stopping%s", self.name, held)
        self._stop.set()
        job = self.current
        if job is not None:
            try:
                TRAINING.hand_back(self.r, self.keys, job)
            except redis.RedisError as exc:
                log.warning("could not hand back job %s: %s", job, exc)

    def heartbeat_info(self) -> dict[str, Any]:
        return {"job": self.current, "launcher": self.launcher}

    def housekeeping(self) -> None:
        self.remove_deleted()

    def error_of(self, exc: Exception) -> str:
        self._log(self.current or "", "traceback", "error", traceback=traceback.format_exc(limit=20))
        return str(exc) if isinstance(exc, JobError) else super().error_of(exc)

    def remove_deleted(self) -> list[str]:
        """Remove the directories of deleted jobs (DELETE /v1/training-jobs/{id}) from this trainer's train
        dir. Every trainer does it for its own disk; an id stays listed for DELETED_KEEP_S. Returns removed ids."""
        root = self.settings.training_dir().resolve()
        removed = []
        for job_id in TRAINING.deleted_ids(self.r, self.keys, DELETED_KEEP_S):
            if not is_job_id(job_id) or job_id == self.current:
                continue
            path = root / job_id
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(job_id)
                log.info("trainer %s: removed %s of deleted job %s", self.name, path, job_id)
        return removed

    def output_dir(self, job_id: str) -> Path:
        """The job's own directory, GRAPE_TRAIN_DIR/<job id>: nothing in a request chooses it, and ids are
        the gateway's (`job-` and 12 hex digits), so two jobs never share one."""
        if not is_job_id(job_id):
            raise JobError(f"training job id {job_id!r} is not one the gateway makes (job-<12 hex digits>)")
        return self.settings.training_dir().resolve() / job_id

    def work(self, job_id: str, spec_json: bytes) -> None:
        self._run(job_id, JobSpec.model_validate_json(spec_json))

    def _run(self, job_id: str, spec: JobSpec) -> None:
        resume = run(self.r, TRAINING.field(self.keys, job_id, "resume")) == "1"
        out = self.output_dir(job_id)
        if not resume and checkpoint_dirs(out):
            raise JobError(f"{out} already holds checkpoints of an earlier run of this job: resume the job instead")
        out.mkdir(parents=True, exist_ok=True)
        self._set(job_id, output_dir=str(out), resume="")
        data = out / SELECTION_FILE
        if resume and data.exists():  # a resumed run trains on exactly the records of the first run
            with open(data, "rb") as f:
                n = sum(1 for line in f if line.strip())
            self._log(job_id, f"resuming: reusing the selected set ({n} records) in {data}")
        elif spec.selection_ref:  # an experiment arm: exactly the selection the experiment stored
            n = write_stored_selection(self.r, self.keys, spec.selection_ref, data)
            self._log(job_id, f"experiment selection {spec.selection_ref}: {n} records in {data}")
        else:
            params = spec.select_params()
            n = write_selection(self.r, self.keys, spec.dataset_id, spec.strategy, params, data)
            self._log(job_id, f"selected set materialized: {n} records ({spec.strategy}, k={spec.k}) in {data}")
        self._set(job_id, train_records=n)
        if n == 0:
            raise JobError(f"the selection of dataset {spec.dataset_id} ({spec.strategy}) is empty: nothing to train")
        flag, _ = run(self.r, TRAINING.watch(self.keys, job_id, self.name))
        if flag == CANCEL:
            self._end(job_id, JobState.cancelled, "cancelled before training started")
            return
        if flag == REQUEUE:
            self._end(job_id, JobState.queued, f"handed back before training started (trainer {self.name} stopped)")
            return
        ctx = TrainContext(job_id, spec, data, out, resume=resume, trainer_name=self.name, settings=self.settings)
        outcome = self._train(ctx)
        keep = kept_checkpoints(spec.hyperparameters.save_total_limit, self.settings.train_save_total_limit)
        ckpts = checkpoint_dirs(out)[-keep:]  # the newest, as transformers keeps them on disk
        self._set(job_id, checkpoints=orjson.dumps(ckpts).decode())
        if outcome.stop is Stop.none:
            self._set(job_id, model_path=outcome.model_path or "")
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
                "GRAPE_MAX_TRAIN_TOKENS": str(self.settings.max_train_tokens),
                "GRAPE_MAX_TRAIN_SAVES": str(self.settings.max_train_saves),
                "GRAPE_TRAIN_SAVE_TOTAL_LIMIT": str(self.settings.train_save_total_limit),
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
        # its own session (a signal to the trainer's terminal group is not the job's), yet it dies with this
        # trainer however the trainer ends: armed before its exec (grape.lifeline), from this thread, which
        # waits for it, so the signal cannot come early when the trainer runs in a thread of its own
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                lifeline.command(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=lifeline.child_env(env),
                start_new_session=True,
            )
            code = proc.wait()
        if code != 0 or not outcome_file.exists():
            tail = logfile.read_text(errors="replace").strip().splitlines()[-8:]
            raise JobError(f"training process exited with code {code}: " + " | ".join(tail))
        return Outcome.from_json(outcome_file.read_bytes())
