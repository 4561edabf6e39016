"""GET /v1/usage: what the caller's tenant holds against its quotas (an admin: every tenant's)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import KeysDep, RedisDep, SettingsDep
from service.tenancy import IdentityDep, UsagePublic, usage_of

router = APIRouter(prefix="/v1/usage", tags=["tenants"])


@router.get("", response_model=UsagePublic)
async def get_usage(redis: RedisDep, keys: KeysDep, settings: SettingsDep, who: IdentityDep) -> UsagePublic:
    """Per quota (stored_pairs, datasets, active_training_jobs, active_evaluations, active_experiments): the
    tenant's usage now and its limit. An admin also gets `tenants`: every tenant's."""
    return await usage_of(redis, keys, settings, who)
