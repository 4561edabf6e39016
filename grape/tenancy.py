"""Tenants and their quotas: who owns a resource, and how much of the deployment a tenant may hold.

A tenant is a name (`grape.settings.TENANT_NAME`) that API keys belong to (`GRAPE_API_KEYS` entries are
`tenant:key`). Every dataset, training job, evaluation and experiment records its tenant (grape.store.tenants);
a record without one predates tenants and belongs to `default`.

Quotas are per tenant: the settings' defaults (`GRAPE_QUOTA_*`), overridden by the operator's TOML file
(`GRAPE_TENANTS_FILE`):

    [defaults]
    active_training_jobs = 4

    [tenants.vision]
    stored_pairs = 50_000_000
    datasets = 200

An unknown table, quota name, tenant name or a value that is not a non-negative integer is an error at start.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grape.settings import DEFAULT_TENANT, TENANT_NAME, Settings

QUOTAS = ("stored_pairs", "datasets", "active_training_jobs", "active_evaluations", "active_experiments")
"""The quota names, in the order answers list them."""

QUOTA_WHAT = {
    "stored_pairs": "(instruction, candidate) pairs stored in the tenant's datasets",
    "datasets": "datasets",
    "active_training_jobs": "training jobs queued or running",
    "active_evaluations": "evaluations queued or running",
    "active_experiments": "unfinished experiments",
}


@dataclass(frozen=True)
class Identity:
    """Who is calling: the tenant of the key that matched, whether it is an operator (admin) key, and which key
    matched (an opaque name, never the key itself: per-key limits count by it)."""

    tenant: str
    admin: bool
    key_id: str

    def sees(self, owner: str) -> bool:
        """Whether a resource owned by `owner` exists for this caller."""
        return self.admin or owner == self.tenant


LOCAL = Identity(DEFAULT_TENANT, True, "local")
"""The one user of a gateway without keys (local mode): tenant `default`, and the operator too."""


@dataclass(frozen=True)
class Quotas:
    """The quota of every tenant: `defaults` for all, `tenants` overrides for some (only the quotas named)."""

    defaults: dict[str, int]
    tenants: dict[str, dict[str, int]] = field(default_factory=dict)

    def limits(self, tenant: str) -> dict[str, int]:
        return {**self.defaults, **self.tenants.get(tenant, {})}

    def limit(self, tenant: str, quota: str) -> int:
        return self.limits(tenant)[quota]


def _table(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a table of quotas ({', '.join(QUOTAS)})")
    out: dict[str, int] = {}
    for name, v in value.items():
        if name not in QUOTAS:
            raise ValueError(f"{where}: unknown quota {name!r}; the quotas are {', '.join(QUOTAS)}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}.{name}: expected a non-negative integer, got {v!r}")
        out[name] = v
    return out


def parse_quotas(doc: dict[str, Any], defaults: dict[str, int], source: str = "GRAPE_TENANTS_FILE") -> Quotas:
    """The quotas of a parsed tenants file over the settings' `defaults`; ValueError naming what is wrong."""
    unknown = [k for k in doc if k not in ("defaults", "tenants")]
    if unknown:
        raise ValueError(f"{source}: unknown table {unknown[0]!r}; expected [defaults] and [tenants.NAME]")
    base = {**defaults, **_table(doc.get("defaults", {}), f"{source}: [defaults]")}
    tenants_doc = doc.get("tenants", {})
    if not isinstance(tenants_doc, dict):
        raise ValueError(f"{source}: `tenants` must be tables, [tenants.NAME]")
    tenants: dict[str, dict[str, int]] = {}
    for name, table in tenants_doc.items():
        if not TENANT_NAME.fullmatch(name):
            raise ValueError(
                f"{source}: [tenants.{name[:40]}]: a tenant is 1-32 characters of a-z, 0-9, '_' and '-', "
                "starting with a letter or digit"
            )
        tenants[name] = _table(table, f"{source}: [tenants.{name}]")
    return Quotas(base, tenants)


def load_quotas(settings: Settings) -> Quotas:
    """The deployment's quotas: the settings' defaults, with GRAPE_TENANTS_FILE's overrides when it is set."""
    defaults = settings.default_quotas()
    if settings.tenants_file is None:
        return Quotas(defaults)
    path = Path(settings.tenants_file)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"GRAPE_TENANTS_FILE {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"GRAPE_TENANTS_FILE {str(path)!r} is not valid TOML: {exc}") from None
    return parse_quotas(doc, defaults, f"GRAPE_TENANTS_FILE {str(path)!r}")


_loaded: dict[tuple[Any, ...], Quotas] = {}


def quotas_of(settings: Settings) -> Quotas:
    """The quotas of these settings, the tenants file read once per process (a change needs a restart; the
    gateway reads it at start, so a bad file stops it there)."""
    cache_key = (str(settings.tenants_file), tuple(settings.default_quotas().items()))
    if cache_key not in _loaded:
        _loaded[cache_key] = load_quotas(settings)
    return _loaded[cache_key]


def configured_tenants(settings: Settings, quotas: Quotas) -> list[str]:
    """The tenants the operator named: those of the keys and those of the tenants file."""
    names = {tenant for tenant, _, _ in settings.key_entries()} | set(quotas.tenants)
    return sorted(names or {DEFAULT_TENANT})
