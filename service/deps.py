"""Dependencies, declared once as aliases so routes read as plain typed parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from grape.keys import Keys
from grape.settings import Settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_keys(request: Request) -> Keys:
    return request.app.state.keys


RedisDep = Annotated[Redis, Depends(get_redis)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
KeysDep = Annotated[Keys, Depends(get_keys)]
