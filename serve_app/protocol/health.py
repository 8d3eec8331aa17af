"""GET /health's answers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class HealthOk(BaseModel):
    status: Literal["ok"] = "ok"
    # Each one's own figures, e.g. a chat replica's running and waiting sequences; {"saturated": true} while its queue is full.
    deployments: dict[str, dict[str, Any]]


class HealthUnavailable(BaseModel):
    status: Literal["unavailable"] = "unavailable"
    failing: list[str]  # the deployments that did not answer
