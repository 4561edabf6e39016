"""Errors the service functions raise; the app turns them into HTTP answers."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 400

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class NotFound(ApiError):
    status = 404


class BadRequest(ApiError):
    status = 400


class Unprocessable(ApiError):
    status = 422


class TooLarge(ApiError):
    status = 413
