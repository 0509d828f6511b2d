"""GET /: the fleet dashboard, one server-rendered page whose small script reads the /v1 API.

The page itself holds no data and needs no key; its script calls the API with the key the user
gives (a viewer key is enough), kept in the tab's sessionStorage only.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["dashboard"])
PAGE = "dashboard.html"


@cache
def _page() -> str:
    return resources.files("fieldline.cloud.api").joinpath(PAGE).read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> HTMLResponse:
    return HTMLResponse(
        _page(),
        headers={
            # The script talks only to this origin; nothing loads from anywhere else.
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; img-src 'self' data:",
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )
