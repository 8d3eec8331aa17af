"""GET /health: 200 only once every deployment behind the ingress answers."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.protocol.health import HealthOk, HealthUnavailable
from serve_app.registry import ModelRegistry
from serve_app.routes import deps

router = APIRouter(tags=["health"])

_TIMEOUT_S = 5.0


async def _status(handle: DeploymentHandle) -> dict[str, Any] | None:
    try:
        return dict(await asyncio.wait_for(handle.status.remote(), _TIMEOUT_S))
    except BackPressureError:
        # Its replicas are busy, not broken: a full queue must not take the server out of a load balancer's
        # rotation, which would only pile the load onto fewer servers.
        return {"saturated": True}
    except Exception:  # noqa: BLE001 - any other failure to answer means not healthy
        return None


@router.get(
    "/health",
    response_model=HealthOk,
    responses={503: {"model": HealthUnavailable, "description": "Some deployment did not answer"}},
)
async def health(registry: Annotated[ModelRegistry, Depends(deps.registry)]) -> JSONResponse:
    """Every deployment's own figures (a chat replica's running and waiting sequences, for one); 503 if any is silent."""
    deployments = registry.deployments()
    answers = dict(zip(deployments, await asyncio.gather(*(_status(h) for h in deployments.values()))))
    failing = [name for name, answer in answers.items() if answer is None]
    if failing:
        return JSONResponse(HealthUnavailable(failing=failing).model_dump(), status_code=503)
    healthy = {name: answer for name, answer in answers.items() if answer is not None}  # all of them, typed
    return JSONResponse(HealthOk(deployments=healthy).model_dump())
