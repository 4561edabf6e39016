"""Fine-tuning jobs: the selected set of a scored dataset, trained by a `grape trainer` process with TRL."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import StreamingResponse

from service import training as svc
from service.deps import KeysDep, RedisDep, SettingsDep
from service.logs import LOG_RESPONSES, After, ndjson
from service.tenancy import IdentityDep, OwnedJobId, scope_of
from service.training_schemas import TrainingJobCreate, TrainingJobCreated, TrainingJobList, TrainingJobPublic

router = APIRouter(prefix="/v1/training-jobs", tags=["training"])


@router.post("", response_model=TrainingJobCreated, status_code=status.HTTP_201_CREATED)
async def create_training_job(
    body: TrainingJobCreate, redis: RedisDep, keys: KeysDep, settings: SettingsDep, who: IdentityDep
) -> TrainingJobCreated:
    return await svc.create_job(redis=redis, keys=keys, settings=settings, body=body, who=who)


@router.get("", response_model=TrainingJobList)
async def list_training_jobs(
    redis: RedisDep, keys: KeysDep, who: IdentityDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
) -> TrainingJobList:
    """The newest jobs of the caller's tenant (an admin: of every tenant)."""
    return await svc.list_jobs(redis=redis, keys=keys, limit=limit, tenant=scope_of(who))


@router.get("/{job_id}", response_model=TrainingJobPublic)
async def get_training_job(job_id: OwnedJobId, redis: RedisDep, keys: KeysDep) -> TrainingJobPublic:
    return await svc.get_job(redis=redis, keys=keys, job_id=job_id)


@router.get("/{job_id}/logs", response_class=StreamingResponse, responses=LOG_RESPONSES)
async def training_job_logs(
    job_id: OwnedJobId,
    redis: RedisDep,
    keys: KeysDep,
    follow: Annotated[bool, Query(description="Keep streaming new records until the job ends.")] = False,
    after: After = "0-0",
) -> StreamingResponse:
    await svc.get_job(redis=redis, keys=keys, job_id=job_id)  # 404 before the stream starts
    lines = svc.log_lines(redis=redis, keys=keys, job_id=job_id, follow=follow, after=after)
    return ndjson(lines)


@router.post("/{job_id}/cancel", response_model=TrainingJobPublic, status_code=status.HTTP_202_ACCEPTED)
async def cancel_training_job(job_id: OwnedJobId, redis: RedisDep, keys: KeysDep) -> TrainingJobPublic:
    """A queued job is cancelled at once; a running one stops after its current step, saving a checkpoint."""
    return await svc.cancel_job(redis=redis, keys=keys, job_id=job_id)


@router.post("/{job_id}/resume", response_model=TrainingJobPublic, status_code=status.HTTP_202_ACCEPTED)
async def resume_training_job(
    job_id: OwnedJobId, redis: RedisDep, keys: KeysDep, settings: SettingsDep
) -> TrainingJobPublic:
    """Queue a failed or cancelled job again; it resumes from its last checkpoint when one exists. It counts
    against its tenant's active_training_jobs again (403 when full)."""
    return await svc.resume_job(redis=redis, keys=keys, job_id=job_id, settings=settings)


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, responses={409: {"description": "Running."}})
async def delete_training_job(job_id: OwnedJobId, redis: RedisDep, keys: KeysDep) -> Response:
    """Remove a job that is not running (409 while it runs: cancel it first): its record and log at once;
    trainers then remove its directory, GRAPE_TRAIN_DIR/<job id>, with its checkpoints and model."""
    await svc.delete_job(redis=redis, keys=keys, job_id=job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
