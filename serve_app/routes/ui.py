"""The web chat page at GET /: one HTML file and its script and stylesheet, all shipped in the package.

Nothing is fetched from a CDN, so the page works on a machine with no internet access.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter(tags=["ui"])

_STATIC = Path(__file__).resolve().parents[1] / "static"
# A fixed list, not a directory listing: no request can name any other file (no path traversal to guard).
_ASSETS = {"app.js": "text/javascript", "markdown.js": "text/javascript", "style.css": "text/css"}


@router.get(
    "/",
    response_class=FileResponse,
    responses={200: {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}}},
)
async def web_chat_page() -> FileResponse:
    """The chat page; it talks to /v1/models and /v1/chat/completions like any other client."""
    return FileResponse(str(_STATIC / "index.html"), media_type="text/html")


# Left out of the OpenAPI schema: these are the page's own files, not part of the API.
@router.get("/static/{name}", include_in_schema=False)
async def web_chat_asset(name: str) -> FileResponse:
    if name not in _ASSETS:
        raise HTTPException(status_code=404, detail=f"no static file named {name!r}")
    return FileResponse(str(_STATIC / name), media_type=_ASSETS[name])
