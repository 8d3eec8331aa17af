"""A second Serve app beside the session's, under its own route prefix, for tests that need other settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def extra_app(
    base_url: str, name: str, prefix: str, args: dict[str, Any], healthy_within_s: float
) -> Iterator[str]:
    """Build the app from glm-serve config `args`, serve it at `prefix` on the session's Serve, yield its URL once
    /health answers 200, and delete it afterwards."""
    from ray import serve

    from serve_app.builder import bind_graph, parse_config
    from serve_app.runtime import wait_until_healthy

    serve.run(bind_graph(parse_config(args)), name=name, route_prefix=prefix)
    url = base_url + prefix
    try:
        wait_until_healthy(url, timeout_s=healthy_within_s)
        yield url
    finally:
        serve.delete(name)
