"""The job's eyes and brakes inside TRL's training loop, as a `TrainerCallback` (no rewritten loop).

- Progress (step, loss, learning rate, tokens seen, ETA, checkpoints) and log records go to Redis from
  the main process only (`state.is_world_process_zero`).
- After every optimizer step the main process reads the job's cancel flag and whether the job is still
  this trainer's; the decision is broadcast so every rank stops at the same step (a rank that stopped
  alone would hang the others in their next collective). Cancel and hand-back save a checkpoint first.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import orjson
import redis
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from grape.keys import Keys
from grape.store.io import run
from grape.store.jobqueue import CANCEL, REQUEUE, TRAINING
from trainer.context import Stop, checkpoint_dirs

log = logging.getLogger(__name__)


_CODES = {Stop.none: 0, Stop.cancel: 1, Stop.requeue: 2, Stop.lost: 3}


def _field(v: Any) -> str:
    """A progress value as a hash field; a non-finite number (a diverged loss) is stored empty (unknown)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class JobProgressCallback(TrainerCallback):
    def __init__(self, client: redis.Redis, keys: Keys, job_id: str, trainer: str) -> None:
        self.r = client
        self.keys = keys
        self.job_id = job_id
        self.trainer = trainer
        self.stop = Stop.none
        self._t0 = 0.0
        self._step0 = 0

    # helpers -------------------------------------------------------------------------------------
    def _hset(self, **fields: Any) -> None:
        try:
            TRAINING.set_fields(self.r, self.keys, self.job_id, {k: _field(v) for k, v in fields.items()})
        except redis.RedisError as exc:  # progress is best effort; training goes on
            log.warning("job %s: progress not written: %s", self.job_id, exc)

    def _log(self, msg: str, level: str = "info", **data: Any) -> None:
        try:
            TRAINING.log(self.r, self.keys, self.job_id, msg, level, **data)
        except redis.RedisError as exc:
            log.warning("job %s: log record not written: %s", self.job_id, exc)

    def _read_stop(self) -> Stop:
        try:
            flag, held = run(self.r, TRAINING.watch(self.keys, self.job_id, self.trainer))
        except redis.RedisError as exc:
            log.warning("job %s: cancel flag not read: %s", self.job_id, exc)
            return Stop.none
        if not held:
            return Stop.lost
        return Stop(flag) if flag in (CANCEL, REQUEUE) else Stop.none

    @staticmethod
    def _agree(args: TrainingArguments, code: int) -> int:
        """Rank 0's decision on every rank."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return code
        t = torch.tensor([code], dtype=torch.int64, device=args.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    # hooks ---------------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> TrainerControl:
        self._t0 = time.monotonic()
        self._step0 = state.global_step
        if state.is_world_process_zero:
            self._hset(max_steps=state.max_steps, step=state.global_step, progress_at=f"{time.time():.3f}")
            resumed = f", resuming at step {state.global_step}" if state.global_step else ""
            self._log(
                f"training: {state.max_steps} steps on {args.world_size} process(es){resumed}",
                max_steps=state.max_steps,
                world_size=args.world_size,
            )
        return control

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> TrainerControl:
        code = _CODES[self._read_stop()] if state.is_world_process_zero else 0
        stop = next(s for s, c in _CODES.items() if c == self._agree(args, code))
        if state.is_world_process_zero:
            done = state.global_step - self._step0
            elapsed = time.monotonic() - self._t0
            sps = done / elapsed if elapsed > 0 and done > 0 else None
            eta = (state.max_steps - state.global_step) / sps if sps else None
            self._hset(
                step=state.global_step,
                epoch=float(state.epoch or 0.0),
                tokens_seen=int(state.num_input_tokens_seen or 0),
                steps_per_second=sps,
                eta_seconds=eta,
                progress_at=f"{time.time():.3f}",
            )
        if stop is not Stop.none and self.stop is Stop.none:
            self.stop = stop
            control.should_training_stop = True
            control.should_save = stop in (Stop.cancel, Stop.requeue)
            if state.is_world_process_zero and stop is not Stop.lost:
                why = "cancelled" if stop is Stop.cancel else "trainer shutting down"
                self._log(f"{why}: stopping at step {state.global_step}, saving a checkpoint")
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kw: Any,
    ) -> TrainerControl:
        if not state.is_world_process_zero or not logs:
            return control
        fields = {k: logs[k] for k in ("loss", "learning_rate", "grad_norm") if isinstance(logs.get(k), int | float)}
        if fields:
            self._hset(**{k: float(v) for k, v in fields.items()})
        numbers = {k: v for k, v in logs.items() if isinstance(v, int | float) and k != "step"}
        if fields:
            msg = f"step {state.global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in fields.items())
        else:  # the end-of-training summary (train_runtime, train_loss, ...)
            msg = f"step {state.global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())
        self._log(msg, step=state.global_step, **numbers)
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> TrainerControl:
        if state.is_world_process_zero:
            # the newest save_total_limit, as on disk after transformers' rotation: the record stays bounded
            dirs = checkpoint_dirs(args.output_dir)[-(args.save_total_limit or 1) :]
            self._hset(checkpoints=orjson.dumps(dirs).decode())
            self._log(f"checkpoint saved at step {state.global_step}", path=dirs[-1] if dirs else None)
        return control
