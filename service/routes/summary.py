"""GET /v1/datasets/{id}/summary (wins per source, score histograms) and /teachers (sources ranked by local
and GRAPE scores), for the status page."""

from __future__ import annotations

from fastapi import APIRouter

from grape.strategies import Reduce, SelectParams
from service import summary as svc
from service import teachers as teachers_svc
from service.deps import KeysDep, RedisDep, SettingsDep
from service.schemas import DatasetSummary, TeachersPublic
from service.tenancy import OwnedDatasetId

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.get("/{dataset_id}/summary", response_model=DatasetSummary)
async def dataset_summary(
    dataset_id: OwnedDatasetId,
    redis: RedisDep,
    keys: KeysDep,
    settings: SettingsDep,
    reduce: Reduce = SelectParams.model_fields["reduce"].default,
) -> DatasetSummary:
    """How often GRAPE (k=1) selects each source, and histograms of all and of the selected scores."""
    return await svc.dataset_summary(
        redis=redis, keys=keys, dataset_id=dataset_id, reduce=reduce, max_sources=settings.max_report_sources
    )


@router.get("/{dataset_id}/teachers", response_model=TeachersPublic)
async def dataset_teachers(
    dataset_id: OwnedDatasetId, redis: RedisDep, keys: KeysDep, settings: SettingsDep
) -> TeachersPublic:
    """Per source (teacher): mean local (LALP) and mean GRAPE score over the instructions it answered, both
    rankings side by side. Needs local scores (422 otherwise); lists GRAPE_MAX_REPORT_SOURCES sources."""
    return await teachers_svc.teachers(
        redis=redis, keys=keys, dataset_id=dataset_id, max_sources=settings.max_report_sources
    )
