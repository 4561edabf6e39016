"""What a request may name that the operator controls: models (GRAPE_ALLOWED_MODELS) and training chat
templates (by name, grape.chat_templates). A caller is untrusted; the operator's settings decide."""

from __future__ import annotations

from redis.asyncio import Redis

from grape.chat_templates import known_names
from grape.keys import Keys
from grape.models import allowed_models
from grape.settings import Settings
from grape.store import heartbeats
from service.errors import Unprocessable, shown

SHOWN_MODELS = 50


async def allowed(redis: Redis, keys: Keys, settings: Settings) -> list[str] | None:
    """The allowed model names now (None: any). The default reads the live workers' heartbeats (one
    ZRANGEBYSCORE and one MGET), so a model becomes usable as soon as a worker serves it."""
    configured = settings.allowed_model_names()
    served = [] if configured else [str(b.get("model") or "") for b in await heartbeats.live(redis, keys)]
    return allowed_models(configured, served)


async def check_model(*, redis: Redis, keys: Keys, settings: Settings, name: str, field: str) -> None:
    """422 naming `field` and the setting when `name` is not a model the operator allows."""
    names = await allowed(redis, keys, settings)
    if names is None or name.strip() in names:
        return
    listed = ", ".join(names[:SHOWN_MODELS]) + (", ..." if len(names) > SHOWN_MODELS else "")
    raise Unprocessable(
        f"{field} {shown(name)} is not a model this deployment allows: {listed} (the operator's "
        "GRAPE_ALLOWED_MODELS; by default the bundled models and the models live workers serve)",
        field=field,
        allowed_models=names[:SHOWN_MODELS],
    )


def check_chat_template(settings: Settings, name: str | None) -> None:
    """A training chat template name the gateway can check: refused (422) when the gateway has the
    operator's GRAPE_CHAT_TEMPLATE_DIR and no template has that name. Without the directory here, a name
    grape and TRL do not ship is left to the trainer, which fails the job naming the known templates."""
    if name is None or settings.chat_template_dir is None:
        return
    names = known_names(settings.chat_template_dir)
    if name not in names:
        raise Unprocessable(
            f"hyperparameters.chat_template {shown(name)}: no such template; known: {', '.join(names)} "
            f"(NAME.jinja in GRAPE_CHAT_TEMPLATE_DIR, grape's and TRL's own)",
            field="hyperparameters.chat_template",
        )
