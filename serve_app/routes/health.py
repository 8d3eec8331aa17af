"""GET /health: 200 only once every deployment behind the ingress answers."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from serve_app.registry import ModelRegistry
from serve_app.routes import deps

router = APIRouter(tags=["health"])

_PING_TIMEOUT_S = 5.0


async def _answers(handle: object) -> bool:
    try:
        return bool(await asyncio.wait_for(handle.ping.remote(), _PING_TIMEOUT_S))  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any failure to answer means not healthy
        return False


@router.get("/health")
async def health(registry: Annotated[ModelRegistry, Depends(deps.registry)]) -> JSONResponse:
    deployments = registry.deployments()
    answers = await asyncio.gather(*(_answers(handle) for handle in deployments.values()))
    failing = [name for name, ok in zip(deployments, answers) if not ok]
    if failing:
        return JSONResponse({"status": "unavailable", "failing": failing}, status_code=503)
    return JSONResponse({"status": "ok"})
