"""GET /health's answers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class HealthOk(BaseModel):
    status: Literal["ok"] = "ok"
    deployments: dict[str, dict[str, Any]]  # each one's own figures, e.g. a chat replica's active sequences


class HealthUnavailable(BaseModel):
    status: Literal["unavailable"] = "unavailable"
    failing: list[str]  # the deployments that did not answer
