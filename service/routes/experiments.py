"""Experiments: one model trained per selection strategy on an equal budget, each evaluated with lm-eval."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated

from fastapi import APIRouter, FastAPI, Path, Query, status
from fastapi.responses import Response, StreamingResponse

from service import experiments as svc
from service import retention
from service.deps import KeysDep, RedisDep, SettingsDep
from service.experiment_schemas import ExperimentCreate, ExperimentCreated, ExperimentList, ExperimentPublic
from service.tenancy import IdentityDep, OwnedExpId, scope_of


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Advance unfinished experiments in the background (inside the app's lifespan: Redis is connected)."""
    import asyncio

    settings = app.state.settings
    task = asyncio.create_task(
        svc.driver(
            redis=app.state.redis,
            keys=app.state.keys,
            settings=settings,
            interval_s=settings.experiment_poll_s,
            sweep=retention.sweep,
        ),
        name="experiment-driver",
    )
    try:
        yield
    finally:
        # redis-py (8.1) can swallow a cancel that lands while it opens a connection: ask until the task ends
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1)
        with suppress(asyncio.CancelledError):
            await task


router = APIRouter(prefix="/v1/experiments", tags=["experiments"], lifespan=lifespan)


@router.post("", response_model=ExperimentCreated, status_code=status.HTTP_201_CREATED)
async def create_experiment(
    body: ExperimentCreate, redis: RedisDep, keys: KeysDep, settings: SettingsDep, who: IdentityDep
) -> ExperimentCreated:
    """403 (naming the quota) when the tenant has no free active_experiments slot, or fewer free
    active_training_jobs slots than arms: refused before anything is stored."""
    return await svc.create_experiment(redis=redis, keys=keys, settings=settings, body=body, who=who)


@router.get("", response_model=ExperimentList)
async def list_experiments(
    redis: RedisDep, keys: KeysDep, who: IdentityDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> ExperimentList:
    """The newest experiments of the caller's tenant (an admin: of every tenant)."""
    exps = await svc.list_experiments(redis=redis, keys=keys, limit=limit, tenant=scope_of(who))
    return ExperimentList(experiments=exps)


@router.get("/{exp_id}", response_model=ExperimentPublic)
async def get_experiment(exp_id: OwnedExpId, redis: RedisDep, keys: KeysDep, settings: SettingsDep) -> ExperimentPublic:
    return await svc.get_experiment(redis=redis, keys=keys, settings=settings, exp_id=exp_id)


@router.get(
    "/{exp_id}/arms/{arm}/selection",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}, "description": "The pairs the arm trained on."}},
)
async def arm_selection(
    exp_id: OwnedExpId, arm: Annotated[int, Path(ge=0, le=1000)], redis: RedisDep, keys: KeysDep
) -> StreamingResponse:
    """Streamed as stored, a page at a time (the gateway never holds the whole selection)."""
    pages = await svc.arm_selection(redis=redis, keys=keys, exp_id=exp_id, arm=arm)
    return StreamingResponse(pages, media_type="application/x-ndjson")


@router.post("/{exp_id}/cancel", response_model=ExperimentPublic, status_code=status.HTTP_202_ACCEPTED)
async def cancel_experiment(
    exp_id: OwnedExpId, redis: RedisDep, keys: KeysDep, settings: SettingsDep
) -> ExperimentPublic:
    """Cancel the training jobs and evaluations of the experiment that have not finished."""
    return await svc.cancel_experiment(redis=redis, keys=keys, settings=settings, exp_id=exp_id)


@router.delete("/{exp_id}", status_code=status.HTTP_204_NO_CONTENT, responses={409: {"description": "Not finished."}})
async def delete_experiment(
    exp_id: OwnedExpId,
    redis: RedisDep,
    keys: KeysDep,
    settings: SettingsDep,
    with_runs: Annotated[
        bool, Query(description="Also delete its training jobs (and their models) and its evaluations.")
    ] = False,
) -> Response:
    """Remove an experiment that has ended (409 before: cancel it first), with its arms' stored selections. Its
    training jobs and evaluations stay (they are listed on their own routes) unless `with_runs=true`."""
    await svc.delete_experiment(redis=redis, keys=keys, settings=settings, exp_id=exp_id, with_runs=with_runs)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
