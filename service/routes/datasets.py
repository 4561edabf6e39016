from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from service import compare as compare_svc
from service import datasets as svc
from service.deps import KeysDep, RedisDep, RedisThreadsDep, SettingsDep, upload_slot
from service.errors import TooLarge
from service.ingest import parse_upload, upload_type
from service.model_access import check_model
from service.schemas import (
    CompareQuery,
    ComparisonPublic,
    DatasetCreate,
    DatasetList,
    DatasetPublic,
    FailureList,
    IngestResult,
    ItemPublic,
    ItemsIn,
    ScoresQueued,
    ScoresRequest,
    SelectionQuery,
)
from service.tenancy import IdentityDep, OwnedDatasetId, scope_of

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (before it is all in memory). The body
    limit middleware (service.limits) has already checked it against the same limit; this is the
    route's own guard."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body is {declared} bytes, limit {limit} (GRAPE_MAX_BODY_BYTES); split the upload")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise TooLarge(f"body is over {limit} bytes (GRAPE_MAX_BODY_BYTES); split the upload")
        parts.append(part)
    return b"".join(parts)


_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ItemsIn.model_json_schema(ref_template="#/components/schemas/{model}")},
            "application/x-ndjson": {"schema": {"type": "string", "description": "One item object per line."}},
        },
    },
    "responses": {
        "413": {"description": "Body over GRAPE_MAX_BODY_BYTES, or items over GRAPE_MAX_ITEMS_PER_REQUEST."},
        "415": {"description": "Content-Type is neither application/json nor application/x-ndjson."},
        "429": {"description": "Queue past GRAPE_MAX_QUEUE_CHUNKS, or GRAPE_MAX_CONCURRENT_UPLOADS being read."},
    },
}


@router.post("", response_model=DatasetPublic, status_code=status.HTTP_201_CREATED)
async def create_dataset(
    body: DatasetCreate, redis: RedisDep, keys: KeysDep, settings: SettingsDep, who: IdentityDep
) -> DatasetPublic:
    # the target model is one the operator allows (GRAPE_ALLOWED_MODELS): jobs train it by default
    await check_model(redis=redis, keys=keys, settings=settings, name=body.target_model, field="target_model")
    return await svc.create_dataset(redis=redis, keys=keys, body=body, settings=settings, tenant=who.tenant)


@router.get("", response_model=DatasetList)
async def list_datasets(redis: RedisDep, keys: KeysDep, who: IdentityDep) -> DatasetList:
    """The caller's tenant's datasets (an admin: every tenant's)."""
    return DatasetList(datasets=await svc.list_datasets(redis=redis, keys=keys, tenant=scope_of(who)))


@router.get("/{dataset_id}", response_model=DatasetPublic)
async def get_dataset(dataset_id: OwnedDatasetId, redis: RedisDep, keys: KeysDep) -> DatasetPublic:
    return await svc.dataset_status(redis=redis, keys=keys, dataset_id=dataset_id)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_dataset(dataset_id: OwnedDatasetId, redis: RedisDep, keys: KeysDep) -> Response:
    await svc.delete_dataset(redis=redis, keys=keys, dataset_id=dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{dataset_id}/items",
    response_model=IngestResult,
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=_UPLOAD_DOC,
    summary="Upload items (JSON {items: [...]} or NDJSON)",
)
async def upload_items(
    dataset_id: OwnedDatasetId,
    request: Request,
    response: Response,
    redis: RedisDep,
    keys: KeysDep,
    settings: SettingsDep,
) -> IngestResult:
    # the client's next upload comes on a new connection, which the kernel hands to a gateway process that is
    # waiting for one (`grape serve --workers N`): kept connections would pin each client to the process that
    # accepted it first, however busy (a handshake is nothing beside an upload's megabytes)
    response.headers["Connection"] = "close"
    ctype = upload_type(request.headers.get("content-type", ""))  # 415 before anything is read
    with upload_slot(request, settings):  # 429 past GRAPE_MAX_CONCURRENT_UPLOADS: bounds the memory of parsing
        body = await read_body(request, settings.max_body_bytes)
        # parsing and validating thousands of items is CPU work: off the event loop, so status calls stay quick
        items, rejected, n_rejected, positions = await run_in_threadpool(parse_upload, body, ctype, settings)
        del body
    return await svc.ingest(
        redis=redis,
        keys=keys,
        settings=settings,
        dataset_id=dataset_id,
        items=items,
        rejected=rejected,
        rejected_total=n_rejected,
        positions=positions,
    )


@router.get("/{dataset_id}/items/{item_id:path}", response_model=ItemPublic)
async def get_item(
    dataset_id: OwnedDatasetId,
    item_id: Annotated[
        str, Path(description="The item id, percent-encoded: any characters, `/` included (as %2F or as is).")
    ],
    redis: RedisDep,
    keys: KeysDep,
) -> ItemPublic:
    """One item with its candidates and scores. Item ids may hold any characters: percent-encode the id in
    the path (`a/b?c` -> `a%2Fb%3Fc`); a `/` may also be sent as is."""
    return await svc.get_item(redis=redis, keys=keys, dataset_id=dataset_id, item_id=item_id)


@router.get("/{dataset_id}/failures", response_model=FailureList)
async def list_failures(
    dataset_id: OwnedDatasetId, redis: RedisDep, keys: KeysDep, limit: Annotated[int, Query(ge=1, le=100_000)] = 1000
) -> FailureList:
    return FailureList(failures=await svc.list_failures(redis=redis, keys=keys, dataset_id=dataset_id, limit=limit))


@router.get(
    "/{dataset_id}/selection",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}, "description": "One SFT record per line."}},
)
async def selection(
    dataset_id: OwnedDatasetId,
    redis: RedisDep,
    redis_threads: RedisThreadsDep,
    keys: KeysDep,
    query: Annotated[SelectionQuery, Query()],
) -> StreamingResponse:
    ds, lines = await svc.selection(
        redis=redis,
        redis_threads=redis_threads,
        keys=keys,
        dataset_id=dataset_id,
        strategy=query.strategy,
        params=query.select_params(),
    )
    headers = {"X-Grape-Dataset-State": ds.state.value, "X-Grape-Scored-Items": str(ds.scored_items)}
    return StreamingResponse(lines, media_type="application/x-ndjson", headers=headers)


@router.post("/{dataset_id}/scores", response_model=ScoresQueued, status_code=status.HTTP_202_ACCEPTED)
async def request_scores(
    dataset_id: OwnedDatasetId, body: ScoresRequest, redis: RedisDep, keys: KeysDep, settings: SettingsDep
) -> ScoresQueued:
    """Ask for more score kinds; the items already stored are queued for the tasks that are new."""
    queued = await svc.request_scores(redis=redis, keys=keys, settings=settings, dataset_id=dataset_id, body=body)
    dataset = await svc.dataset_status(redis=redis, keys=keys, dataset_id=dataset_id)
    return ScoresQueued(queued_tasks=queued, dataset=dataset)


@router.get("/{dataset_id}/compare", response_model=ComparisonPublic)
async def compare(
    dataset_id: OwnedDatasetId,
    redis: RedisDep,
    redis_threads: RedisThreadsDep,
    keys: KeysDep,
    settings: SettingsDep,
    query: Annotated[CompareQuery, Query()],
) -> ComparisonPublic:
    """Per strategy on the scored pool: pairs selected, mean response length, share of each source, and
    the pairwise overlap (pairs selected by both). At most GRAPE_MAX_COMPARE_STRATEGIES strategies."""
    return await compare_svc.compare(
        redis=redis,
        redis_threads=redis_threads,
        keys=keys,
        settings=settings,
        dataset_id=dataset_id,
        strategies=[s.strip() for s in query.strategies.split(",") if s.strip()],
        params=query.select_params(),
    )
