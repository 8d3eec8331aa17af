"""Starting and stopping a local Ray + Serve instance (the demo, the tests and the benchmarks share this)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

# Read by Ray's own processes when they start, so they must be in the environment before ray.init.
SERVE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Serving-path tuning, measured with bench/embeddings.py on 2 CPU cores (sequential POST /detokenize,
    # proxy -> ingress -> tokenizer; all four together: server CPU/request -30 to -50%, p50 ~8-9 ms -> ~5.5 ms).
    # Proxy->replica and handle calls over Serve's direct gRPC instead of Ray actor calls + object refs: -20-25% CPU.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # Needed with gRPC: its 4 MiB default turned a 9.5 MB /v1/embeddings answer (2,000 inputs) into a 500.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1),
    # User code on the replica's own loop (ours never blocks it: models run in threads): -5-8% CPU/request.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # Handle router on the caller's loop, not a second loop thread with cross-thread hand-offs: -5-8% CPU/request.
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def start_serve(
    host: str = "127.0.0.1", port: int = 8000, metrics_port: int | None = None, **ray_init: Any
) -> None:
    """Start a local Ray and Serve's HTTP proxy on `port`; Prometheus metrics on `metrics_port` (None: Ray picks
    a free one, see `metrics_url`)."""
    import ray
    from ray import serve

    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    # address="local": always a new Ray of our own. Without it ray.init joins whatever cluster another process
    # (a test's simulated cluster, a killed `ray start`) left in /tmp/ray/ray_current_cluster, and deploys there.
    ray_init.setdefault("address", "local")
    ray.init(
        include_dashboard=False,
        logging_level=logging.WARNING,
        _metrics_export_port=metrics_port,
        **ray_init,
    )
    serve.start(http_options={"host": host, "port": port})


def metrics_url() -> str:
    """Where this Ray node serves Prometheus metrics (Ray's and glm-serve's); call after `start_serve`."""
    import ray

    this_node = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["Alive"] and n["NodeID"] == this_node)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


@contextmanager
def serving(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    healthy_within_s: float = 300,
    metrics_port: int | None = None,
    logging_config: dict[str, Any] | None = None,
    on_ray_started: Callable[[], None] | None = None,
    **ray_init: Any,
) -> Iterator[str]:
    """A local Ray + Serve running `app` at `/` on host:port for the block; yields its URL once /health is 200.
    The demo, the tests, the fuzzer and the benchmarks' servers all start this way. `on_ray_started` runs right
    after ray.init (which installs Ray's own SIGTERM handler), before the app deploys."""
    from ray import serve

    start_serve(host, port, metrics_port, **ray_init)
    try:
        if on_ray_started is not None:
            on_ray_started()
        serve.run(app, name="glm-serve", route_prefix="/", logging_config=logging_config)
        url = f"http://{host}:{port}"
        wait_until_healthy(url, timeout_s=healthy_within_s)
        yield url
    finally:
        stop_serve()


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
