"""The status page: `/` serves service/static/index.html, `/static/...` its script, styles and chart library.

Open without an API key (it is only HTML and JavaScript); the page itself calls the /v1 API, with the
key a person types into it when the gateway has keys.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["status page"])


@router.get("/", include_in_schema=False)
async def status_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)
