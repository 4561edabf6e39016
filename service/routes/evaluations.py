"""Evaluations: a base model or a trained one, evaluated on lm-eval tasks by a `grape evaluator` process."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import StreamingResponse

from grape.evaluations import EvalState
from service import evaluations as svc
from service.deps import KeysDep, RedisDep, SettingsDep
from service.evaluation_schemas import EvaluationCreate, EvaluationCreated, EvaluationList, EvaluationPublic
from service.logs import LOG_RESPONSES, After, ndjson
from service.tenancy import IdentityDep, OwnedEvalId, scope_of

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])


@router.post("", response_model=EvaluationCreated, status_code=status.HTTP_201_CREATED)
async def create_evaluation(
    body: EvaluationCreate, redis: RedisDep, keys: KeysDep, settings: SettingsDep, who: IdentityDep
) -> EvaluationCreated:
    eval_id = await svc.create_evaluation(redis=redis, keys=keys, settings=settings, body=body, who=who)
    return EvaluationCreated(id=eval_id, state=EvalState.queued)


@router.get("", response_model=EvaluationList)
async def list_evaluations(
    redis: RedisDep,
    keys: KeysDep,
    who: IdentityDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    experiment_id: Annotated[str | None, Query(max_length=100, description="Only this experiment's.")] = None,
) -> EvaluationList:
    """The newest evaluations of the caller's tenant (an admin: of every tenant)."""
    evs = await svc.list_evaluations(
        redis=redis, keys=keys, limit=limit, experiment_id=experiment_id, tenant=scope_of(who)
    )
    return EvaluationList(evaluations=evs)


@router.get("/{eval_id}", response_model=EvaluationPublic)
async def get_evaluation(eval_id: OwnedEvalId, redis: RedisDep, keys: KeysDep) -> EvaluationPublic:
    return await svc.get_evaluation(redis=redis, keys=keys, eval_id=eval_id)


@router.get("/{eval_id}/logs", response_class=StreamingResponse, responses=LOG_RESPONSES)
async def evaluation_logs(
    eval_id: OwnedEvalId,
    redis: RedisDep,
    keys: KeysDep,
    follow: Annotated[bool, Query(description="Keep streaming new records until the evaluation ends.")] = False,
    after: After = "0-0",
) -> StreamingResponse:
    await svc.get_evaluation(redis=redis, keys=keys, eval_id=eval_id)  # 404 before the stream starts
    lines = svc.log_lines(redis=redis, keys=keys, eval_id=eval_id, follow=follow, after=after)
    return ndjson(lines)


@router.post("/{eval_id}/cancel", response_model=EvaluationPublic, status_code=status.HTTP_202_ACCEPTED)
async def cancel_evaluation(eval_id: OwnedEvalId, redis: RedisDep, keys: KeysDep) -> EvaluationPublic:
    """A queued evaluation is cancelled at once; a running one as soon as its evaluator stops lm-eval."""
    return await svc.cancel_evaluation(redis=redis, keys=keys, eval_id=eval_id)


@router.delete(
    "/{eval_id}", status_code=status.HTTP_204_NO_CONTENT, responses={409: {"description": "Queued or running."}}
)
async def delete_evaluation(eval_id: OwnedEvalId, redis: RedisDep, keys: KeysDep) -> Response:
    """Remove an evaluation that has ended (409 while queued or running: cancel it first), with its log."""
    await svc.delete_evaluation(redis=redis, keys=keys, eval_id=eval_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
