"""Request and response bodies of the training-job routes, one class per direction."""

from __future__ import annotations

from pydantic import BaseModel, Field

from grape.jobs import JobRequest, JobSpec, JobState


class TrainingJobCreate(JobRequest):
    """A fine-tuning job on a dataset's selected set. Refused (409) while the dataset is still scoring,
    (422) when the selection would be empty, the base model is not allowed, or a field is not one a request
    may set. The job writes only to its own directory, GRAPE_TRAIN_DIR/<job id>, on the trainer."""


class TrainingJobCreated(BaseModel):
    id: str
    state: JobState


class TrainingJobPublic(BaseModel):
    id: str
    state: JobState = Field(description="queued, running, succeeded, failed, cancelled")
    dataset_id: str
    base_model: str
    created: float
    started: float | None = Field(None, description="When the current (or last) run started.")
    finished: float | None = None
    trainer: str | None = Field(None, description="The trainer running the job.")
    attempts: int = Field(0, description="Runs started (more than one after a resume).")
    step: int = Field(0, description="Optimizer steps done.")
    max_steps: int | None = Field(None, description="Optimizer steps of the whole run, once training began.")
    epoch: float | None = None
    loss: float | None = Field(None, description="Latest training loss (mean over the last logging interval).")
    learning_rate: float | None = Field(None, description="Latest learning rate.")
    grad_norm: float | None = None
    tokens_seen: int | None = Field(None, description="Non-padding input tokens trained on, all devices.")
    steps_per_second: float | None = None
    eta_seconds: float | None = Field(None, description="Estimated seconds until the last step.")
    train_records: int | None = Field(None, description="Records in the materialized selected set.")
    output_dir: str | None = Field(
        None, description="The job's own directory on the trainer (GRAPE_TRAIN_DIR/<job id>): checkpoints, model."
    )
    checkpoints: list[str] = Field(default_factory=list, description="Checkpoint directories that exist.")
    model_path: str | None = Field(None, description="The final model, or LoRA adapter, once succeeded.")
    error: str | None = Field(None, description="Why the job failed.")
    cancel_requested: float | None = Field(None, description="When a cancel was asked (running jobs stop soon).")
    spec: JobSpec
    tenant: str = Field("default", description="The tenant that owns it (GRAPE_API_KEYS `tenant:key`).")


class TrainingJobList(BaseModel):
    jobs: list[TrainingJobPublic]
    unreadable: list[str] = Field(
        default_factory=list,
        description="Ids of stored job records this version cannot read (e.g. written by an older one); "
        "DELETE removes them.",
    )
