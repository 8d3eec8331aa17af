"""Run the graph on a simulated cluster and print where every replica landed, as JSON (used by test_cluster_placement).

A CPU-only head and two worker nodes that declare one GPU each (and an accelerator type) though none exists.
Runs in its own process: a process holds one Ray connection, and the test session already has one.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import defaultdict

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from serve_app.builder import bind_graph, parse_config
from serve_app.profiles import cpu_demo_args
from serve_app.runtime import SERVE_ENV, wait_until_healthy

GPU_NODES = 2


def main(port: int) -> None:
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 0,
            "temp_dir": tempfile.mkdtemp(prefix="ray-cl-", dir="/tmp"),
        },
    )
    gpu_node_ids = set()
    for _ in range(GPU_NODES):
        node = cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1})
        gpu_node_ids.add(node.node_id)
    ray.init(address=cluster.address)
    try:
        args = cpu_demo_args()
        chat = args["chat_models"][0]
        # The cluster profile's placement: one GPU per chat replica, on an H100; nothing else asks for a GPU.
        # As in k8s/rayservice.yaml, a GPU node offers exactly the CPUs of one chat replica, so CPU-only replicas
        # are never placed there (and never keep a GPU node alive).
        chat["device"] = "auto"  # a declared GPU with no CUDA behind it: the chat code must fall back to CPU
        chat["deployment"] = {
            "num_replicas": GPU_NODES,
            "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "H100"},
        }
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(bind_graph(parse_config(args)), name="glm-serve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, timeout_s=180)
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        placement: dict[str, list[bool]] = defaultdict(list)
        for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
            name = actor.class_name or ""
            if name.startswith("ServeReplica:glm-serve:"):
                placement[name.split(":", 2)[2]].append(actor.node_id in gpu_node_ids)
        print(json.dumps({"placement": placement, "chat_status": reply.status_code, "chat": reply.json()}))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    started = time.monotonic()
    main(int(sys.argv[1]))
    print(f"scenario took {time.monotonic() - started:.0f}s", file=sys.stderr)
