"""Counts the ingress's HTTP responses by route template and status code (the metric is in serve_app/metrics.py).

A plain ASGI middleware, not Starlette's BaseHTTPMiddleware: the body, streamed or not, passes through untouched,
and a response is counted when it starts, with the status it is sent with.
"""

from __future__ import annotations

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.metrics import HttpMetrics

# One label for every path no route matches: raw paths would give the metric one series per typo or scan.
UNMATCHED_ROUTE = "unmatched"


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._metrics = HttpMetrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def send_counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self._metrics.response_started(_route_template(scope), scope["method"], message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_counted)
        except BaseException:
            if not started:  # Starlette's outermost error middleware answers it with a 500
                self._metrics.response_started(_route_template(scope), scope["method"], 500)
            raise


def _route_template(scope: Scope) -> str:
    """The matched route's path template (`/v1/models/{model_id}`), whoever answered the request.

    The router leaves its match in the scope; a response sent before routing (another middleware's, e.g. a 401)
    is matched against the app's routes here.
    """
    route = scope.get("route")
    if route is None:
        for candidate in scope["app"].router.routes:
            if candidate.matches(scope)[0] is not Match.NONE:
                route = candidate
                break
    # path_format: the template without converters (`{model_id}`, not `{model_id:path}`).
    return getattr(route, "path_format", UNMATCHED_ROUTE)
