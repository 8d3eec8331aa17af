"""Starting and stopping a local Ray + Serve instance (the demo, the tests and the benchmarks share this)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import httpx

# Read by Ray's own processes when they start, so they must be in the environment before ray.init.
SERVE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def start_serve(host: str = "127.0.0.1", port: int = 8000, **ray_init: Any) -> None:
    import ray
    from ray import serve

    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(include_dashboard=False, logging_level=logging.WARNING, **ray_init)
    serve.start(http_options={"host": host, "port": port})


def stop_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def wait_until_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: str = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/health", timeout=10)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f}s (last: {last})")
