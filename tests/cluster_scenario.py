"""The graph on a simulated GPU cluster, in three acts; prints one JSON line of findings (test_cluster_placement).

A CPU-only head and two worker nodes that declare one GPU each (and an accelerator type) though none exists.
1. placement: two chat replicas (one per declared GPU) and where every replica landed;
2. unschedulable: the chat deployment asks for a third GPU; what `serve.status()` says while it cannot be placed;
3. autoscaling: chat and embedding deployments with short delays, driven by load up to max_replicas and left idle
   down to min_replicas; the seconds each took, read from `serve.status()`.
Runs in its own process: a process holds one Ray connection, and the test session already has one.
By hand: `python tests/cluster_scenario.py PORT [placement] [unschedulable] [autoscaling]` (~1.5 min for all).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import httpx
import ray
from ray import serve
from ray._private.utils import get_ray_address_file
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from serve_app.builder import bind_graph, parse_config
from serve_app.profiles import CHAT_MODEL, EMBEDDING_MODEL, cpu_demo_args
from serve_app.runtime import HA_PROXY, SERVE_ENV, wait_until_healthy

APP = "glm-serve"
CHAT = f"Chat-{CHAT_MODEL}"
EMBEDDING = f"Embedding-{EMBEDDING_MODEL}"
GPU_NODES = 2
# Serve flags a replica that waits this long for resources (default 30 s; short here to keep the test short).
SLOW_STARTUP_S = 3


def gpu_chat_deployment(**replicas: Any) -> dict[str, Any]:
    # As in serve_config.yaml and k8s/rayservice.yaml: GPU nodes offer no CPUs and chat replicas ask for none, so
    # CPU-only replicas never take a GPU node's room, even while its chat replica is scaled down.
    return {
        **replicas,
        "max_ongoing_requests": 64,
        "ray_actor_options": {"num_cpus": 0, "num_gpus": 1, "accelerator_type": "H100"},
    }


def fast_autoscaling(max_replicas: int) -> dict[str, Any]:
    return {
        "min_replicas": 1,
        "max_replicas": max_replicas,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 1,
        "downscale_delay_s": 3,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
    }


def deploy(args: dict[str, Any], wait_until_running: bool = True) -> None:
    app = bind_graph(parse_config(args))
    if wait_until_running:
        serve.run(app, name=APP, route_prefix="/")
    else:
        serve._run(app, name=APP, route_prefix="/", _blocking=False)


def replicas(deployment: str, state: str = "RUNNING") -> int:
    return serve.status().applications[APP].deployments[deployment].replica_states.get(state, 0)


def wait(condition: Callable[[], bool], timeout_s: float) -> float | None:
    """Seconds until `condition` held, or None if it did not within `timeout_s`."""
    return wait_each({"it": condition}, timeout_s)["it"]


def wait_each(conditions: dict[str, Callable[[], bool]], timeout_s: float) -> dict[str, float | None]:
    """For each condition, the seconds until it first held (None: not within `timeout_s`), all from one origin."""
    started = time.monotonic()
    held: dict[str, float | None] = dict.fromkeys(conditions)
    while time.monotonic() - started < timeout_s and None in held.values():
        for name, condition in conditions.items():
            if held[name] is None and condition():
                held[name] = round(time.monotonic() - started, 1)
        time.sleep(0.25)
    return held


def placement(gpu_node_ids: set[str]) -> dict[str, list[bool]]:
    """Deployment -> for each replica, whether it landed on a GPU-declaring node."""
    landed: dict[str, list[bool]] = defaultdict(list)
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        name = actor.class_name or ""
        if name.startswith(f"ServeReplica:{APP}:"):
            landed[name.split(":", 2)[2]].append(actor.node_id in gpu_node_ids)
    return landed


class Load:
    """Clients in threads sending requests back to back until stopped."""

    def __init__(self, url: str, clients: int, path: str, body: dict[str, Any]) -> None:
        self._stop = threading.Event()
        self.statuses: dict[int, int] = defaultdict(int)
        self._threads = [
            threading.Thread(target=self._client, args=(url + path, body), daemon=True)
            for _ in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _client(self, url: str, body: dict[str, Any]) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                self.statuses[client.post(url, json=body).status_code] += 1

    def stop(self) -> dict[int, int]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        return dict(self.statuses)


def act_placement(url: str, args: dict[str, Any], gpu_node_ids: set[str]) -> dict[str, Any]:
    args["chat_models"][0]["deployment"] = gpu_chat_deployment(num_replicas=GPU_NODES)
    deploy(args)
    wait_until_healthy(url, timeout_s=180)
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    return {"placement": placement(gpu_node_ids), "chat_status": reply.status_code, "chat": reply.json()}


def act_unschedulable(url: str, args: dict[str, Any]) -> dict[str, Any]:
    args["chat_models"][0]["deployment"] = gpu_chat_deployment(num_replicas=GPU_NODES + 1)
    deploy(args, wait_until_running=False)
    flagged = wait(
        lambda: "to be scheduled" in serve.status().applications[APP].deployments[CHAT].message, 60
    )
    chat = serve.status().applications[APP].deployments[CHAT]
    # The two replicas already placed keep serving while the third waits.
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4},
        timeout=60,
    )
    return {
        "flagged_after_s": flagged,
        "status": str(chat.status.value),
        "message": chat.message,
        "replica_states": dict(chat.replica_states),
        "serving_status": reply.status_code,
    }


def act_autoscaling(url: str, args: dict[str, Any]) -> dict[str, Any]:
    args["chat_models"][0]["deployment"] = {
        **gpu_chat_deployment(),
        "autoscaling_config": fast_autoscaling(GPU_NODES),
    }
    args["embedding_models"][0]["deployment"] = {
        "max_ongoing_requests": 64,
        "autoscaling_config": fast_autoscaling(2),
        "ray_actor_options": {"num_cpus": 0.25},
    }
    # Three simulated nodes on a small machine are slow: here the load must wait for the replicas that scaling
    # adds, not be refused at the CPU profile's queue deadlines (which bench/overload.py exercises).
    for model in (*args["chat_models"], *args["embedding_models"]):
        model["queue_deadline"] = None
    deploy(args)
    settled = wait(lambda: replicas(CHAT) == 1 and replicas(EMBEDDING) == 1, 120)
    chat_body = {
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": 256,
        "temperature": 0,
    }
    embedding_body = {"model": EMBEDDING_MODEL, "input": ["a sentence to embed, again and again"] * 64}
    loads = [Load(url, 8, "/v1/chat/completions", chat_body), Load(url, 6, "/v1/embeddings", embedding_body)]
    up = wait_each(
        {CHAT: lambda: replicas(CHAT) == GPU_NODES, EMBEDDING: lambda: replicas(EMBEDDING) == 2}, 120
    )
    at_peak = {name: serve.status().applications[APP].deployments[name] for name in (CHAT, EMBEDDING)}
    at_peak_info = {n: [d.status.value, d.message, dict(d.replica_states)] for n, d in at_peak.items()}
    statuses = [load.stop() for load in loads]
    down = wait_each({CHAT: lambda: replicas(CHAT) == 1, EMBEDDING: lambda: replicas(EMBEDDING) == 1}, 120)
    return {
        "settled_at_min": settled is not None,
        "up_s": up,
        "down_s": down,
        "load_statuses": statuses,
        "at_peak": at_peak_info,
        "resources": ray.available_resources(),
        "final": {CHAT: replicas(CHAT), EMBEDDING: replicas(EMBEDDING)},
    }


def main(port: int) -> None:
    for key, value in {**SERVE_ENV, "RAY_SERVE_SLOW_STARTUP_WARNING_S": str(SLOW_STARTUP_S)}.items():
        os.environ.setdefault(key, value)
    # Serve's Python proxies: the simulated nodes share one host, where each node's HAProxy would take the same
    # ports (the HTTP port among them). A test session that runs behind HAProxy passes its choice down: override.
    os.environ[HA_PROXY] = "0"
    # Cluster writes its address to Ray's default temp dir whatever temp_dir says, and fails on a machine where
    # nothing has made that folder yet.
    os.makedirs(get_ray_address_file(None).rsplit("/", 1)[0], exist_ok=True)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 0,
            "temp_dir": tempfile.mkdtemp(prefix="ray-cl-", dir="/tmp"),
        },
    )
    gpu_node_ids = {
        cluster.add_node(num_cpus=0, num_gpus=1, resources={"accelerator_type:H100": 1}).node_id
        for _ in range(GPU_NODES)
    }
    ray.init(address=cluster.address)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        args = cpu_demo_args()
        # A declared GPU with no CUDA behind it: "auto" must fall back to CPU. Not pinned to one CPU and no prefill
        # thread, as on a cluster (the config refuses both for a device that may be a GPU).
        args["chat_models"][0] |= {"device": "auto", "pin_to_one_cpu": False, "prefill_thread": False}
        findings: dict[str, Any] = {}
        if "placement" in ACTS:
            findings["placement"] = act_placement(url, args, gpu_node_ids)
        if "unschedulable" in ACTS:
            findings["unschedulable"] = act_unschedulable(url, args)
        if "autoscaling" in ACTS:
            findings["autoscaling"] = act_autoscaling(url, args)
        print(json.dumps({"findings": findings}))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    started = time.monotonic()
    ACTS = sys.argv[2:] or ["placement", "unschedulable", "autoscaling"]
    main(int(sys.argv[1]))
    print(f"scenario took {time.monotonic() - started:.0f}s", file=sys.stderr)
