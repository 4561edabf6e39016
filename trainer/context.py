"""What the trainer loop (trainer.loop), the training run (trainer.sft) and its callback (trainer.callbacks)
share: a job's context, why training stopped, and its outcome.

Torch-free and below all three, so that none of them imports another to reach these types: the loop starts
a run with a `TrainContext` and reads back an `Outcome`; the callback decides the `Stop`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from grape.jobs import JobSpec
from grape.settings import Settings

OUTCOME_FILE = "grape_outcome.json"
"""Written by rank 0 of a training process for the trainer loop: {"stop", "model_path", "steps"}."""


class Stop(StrEnum):
    """Why training stopped before its last step."""

    none = "none"  # it did not: trained to the end
    cancel = "cancel"  # the job was cancelled: checkpoint, then cancelled
    requeue = "requeue"  # the trainer is shutting down: checkpoint, then queued again to resume elsewhere
    lost = "lost"  # the job is no longer this trainer's (reaped as dead, cancelled while queued...): stop, no save


@dataclass
class TrainContext:
    job_id: str
    spec: JobSpec
    data_path: Path
    output_dir: Path
    resume: bool = False
    """Resume from the last checkpoint in output_dir, when there is one."""
    trainer_name: str = ""
    settings: Settings | None = None
    """The trainer's (operator's) settings; default: from the environment."""

    def operator(self) -> Settings:
        if self.settings is None:
            from grape.settings import get_settings

            return get_settings()
        return self.settings


@dataclass
class Outcome:
    stop: Stop
    """Stop.none: trained to the end; otherwise why it stopped early."""
    model_path: str | None = None
    steps: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> Outcome:
        """An outcome as a training process wrote it to OUTCOME_FILE (an unknown stop raises ValueError)."""
        data: dict[str, Any] = orjson.loads(raw)
        return cls(stop=Stop(data["stop"]), model_path=data.get("model_path"), steps=int(data.get("steps", 0)))


def checkpoint_dirs(output_dir: str | Path) -> list[str]:
    """Checkpoint directories that exist, oldest step first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return [str(p) for p in sorted(found, key=lambda p: int(p.name.split("-")[-1]))]
