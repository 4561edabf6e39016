from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from grape.strategies import STRATEGIES, SelectParams
from service import datasets as svc
from service.deps import KeysDep, RedisDep, SettingsDep
from service.errors import Unprocessable
from service.ingest import parse_upload
from service.schemas import (
    DatasetCreate,
    DatasetList,
    DatasetPublic,
    FailureList,
    IngestResult,
    ItemPublic,
    ItemsIn,
)

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ItemsIn.model_json_schema(ref_template="#/components/schemas/{model}")},
            "application/x-ndjson": {"schema": {"type": "string", "description": "One item object per line."}},
        },
    }
}


@router.post("", response_model=DatasetPublic, status_code=status.HTTP_201_CREATED)
async def create_dataset(body: DatasetCreate, redis: RedisDep, keys: KeysDep) -> DatasetPublic:
    return await svc.create_dataset(redis=redis, keys=keys, body=body)


@router.get("", response_model=DatasetList)
async def list_datasets(redis: RedisDep, keys: KeysDep) -> DatasetList:
    return DatasetList(datasets=await svc.list_datasets(redis=redis, keys=keys))


@router.get("/{dataset_id}", response_model=DatasetPublic)
async def get_dataset(dataset_id: str, redis: RedisDep, keys: KeysDep) -> DatasetPublic:
    return await svc.dataset_status(redis=redis, keys=keys, dataset_id=dataset_id)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_dataset(dataset_id: str, redis: RedisDep, keys: KeysDep) -> Response:
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
    dataset_id: str, request: Request, redis: RedisDep, keys: KeysDep, settings: SettingsDep
) -> IngestResult:
    body = await request.body()
    items, rejected = parse_upload(body, request.headers.get("content-type", ""), settings)
    return await svc.ingest(
        redis=redis, keys=keys, settings=settings, dataset_id=dataset_id, items=items, rejected=rejected
    )


@router.get("/{dataset_id}/items/{item_id}", response_model=ItemPublic)
async def get_item(dataset_id: str, item_id: str, redis: RedisDep, keys: KeysDep) -> ItemPublic:
    return await svc.get_item(redis=redis, keys=keys, dataset_id=dataset_id, item_id=item_id)


@router.get("/{dataset_id}/failures", response_model=FailureList)
async def list_failures(
    dataset_id: str, redis: RedisDep, keys: KeysDep, limit: Annotated[int, Query(ge=1, le=100_000)] = 1000
) -> FailureList:
    return FailureList(failures=await svc.list_failures(redis=redis, keys=keys, dataset_id=dataset_id, limit=limit))


@router.get(
    "/{dataset_id}/selection",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}, "description": "One SFT record per line."}},
)
async def selection(
    dataset_id: str,
    redis: RedisDep,
    keys: KeysDep,
    strategy: str = "grape",
    k: Annotated[int, Query(ge=1, le=1000)] = 1,
    reduce: Literal["mean", "sum"] = "mean",
) -> StreamingResponse:
    if strategy not in STRATEGIES:
        try:
            STRATEGIES.get(strategy)
        except KeyError as exc:
            raise Unprocessable(f"strategy: {exc}") from None
    ds = await svc.dataset_status(redis=redis, keys=keys, dataset_id=dataset_id)
    lines = svc.selection_lines(
        redis=redis,
        keys=keys,
        dataset_id=dataset_id,
        strategy=strategy,
        params=SelectParams(k=k, reduce=reduce),
    )
    headers = {"X-Grape-Dataset-State": ds.state.value, "X-Grape-Scored-Items": str(ds.scored_items)}
    return StreamingResponse(lines, media_type="application/x-ndjson", headers=headers)
