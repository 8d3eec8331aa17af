"""The HTTP front on two Ray nodes, HAProxy or Serve's proxy: the cluster profile's choice, tried on one machine.

`sudo python k8s/haproxy_two_nodes.py [--front proxy]` (Linux, root: it makes a network namespace; ~100 s on 2
cores). A head node in this machine's namespace and a worker node in a namespace of its own, joined by a veth pair,
so that each node's front owns the HTTP port of its own address, as each pod's does under KubeRay. Both run the CPU
profile's graph with `proxy_location: EveryNode` and the chat replica on the worker node, behind Ray's direct
ingress and HAProxy (`RAY_SERVE_ENABLE_HA_PROXY=1`), or with `--front proxy` Serve's proxy actor (Ray's default).
It prints what each node's front answers, and what the clients of one front get when an ingress replica on the
other node, then the whole other node, goes away under load. Everything it starts is ended by PID, and the
namespace removed, when it ends (k8s/README.md, "Two nodes, one machine").
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from serve_app import process_tree
from serve_app.builder import bind_graph, parse_config
from serve_app.profiles import cpu_demo_args
from serve_app.runtime import HA_PROXY, SERVE_ENV, free_ports, haproxy_port_env, wait_until_healthy

NAMESPACE = "glm-serve-node1"
HEAD, NODE1 = "10.213.0.1", "10.213.0.2"
# Ports free in this machine's namespace (the worker node's is empty): the GCS's and the HTTP port of both fronts.
GCS_PORT, HTTP_PORT = free_ports(2, range(20000, 28000), "0.0.0.0")
RAY = str(Path(sys.executable).with_name("ray"))


@contextmanager
def second_network() -> Iterator[None]:
    """A network namespace for the worker node, linked to this one: HEAD here, NODE1 there."""
    steps = [
        ["ip", "netns", "add", NAMESPACE],
        ["ip", "link", "add", "glm-veth-h", "type", "veth", "peer", "name", "glm-veth-n"],
        ["ip", "link", "set", "glm-veth-n", "netns", NAMESPACE],
        ["ip", "addr", "add", f"{HEAD}/24", "dev", "glm-veth-h"],
        ["ip", "link", "set", "glm-veth-h", "up"],
        ["ip", "netns", "exec", NAMESPACE, "ip", "addr", "add", f"{NODE1}/24", "dev", "glm-veth-n"],
        ["ip", "netns", "exec", NAMESPACE, "ip", "link", "set", "glm-veth-n", "up"],
        ["ip", "netns", "exec", NAMESPACE, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True)
        yield
    finally:
        # The veth pair goes with the namespace once no process is left in it; deleted here in any case.
        subprocess.run(["ip", "netns", "del", NAMESPACE], check=False)
        subprocess.run(["ip", "link", "del", "glm-veth-h"], check=False, capture_output=True)


def node_env(files: Path, ports: dict[str, str], haproxy: bool) -> dict[str, str]:
    """A node's environment: the local starts' Serve settings, the front, and HAProxy's files where no other
    node's are (on a real cluster each pod has its own /tmp); `ports`: HAProxy's own (stats, exporter, fallback)."""
    files.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        **ports,
        **SERVE_ENV,
        HA_PROXY: "1" if haproxy else "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(files / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(files / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(files / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(files),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(files / "server-state"),
    }


def start_node(command: list[str], folder: Path, head: bool, haproxy: bool) -> None:
    """`ray start` with 2 CPUs, Ray's files under `folder`. HAProxy's fixed ports are free ones on the head, which
    shares this machine's namespace with whatever else runs here; the worker node's namespace is its own."""
    ports = haproxy_port_env("0.0.0.0") if head else {}
    env = node_env(folder / "hp", ports, haproxy)
    subprocess.run(
        [*command, "--num-cpus=2", f"--temp-dir={folder / 'ray'}"], env=env, check=True, capture_output=True
    )


def node_processes(ip: str, folder: Path) -> list[psutil.Process]:
    """A node's processes and everything below them: every one whose command line names the node's address (its
    raylet, GCS, workers, Ray's client server) or its files (the autoscaler's monitor, HAProxy)."""
    marks = (f"={ip}", str(folder))
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(mark in cmdline for mark in marks):
            roots.append(process)
    return process_tree.descendants(roots)


def end_nodes(files: Path) -> list[psutil.Process]:
    """Kill both nodes' processes until none is found; those that would not die. A dying HAProxy manager may start
    one more HAProxy after a look, so look again."""
    for _ in range(5):
        found = process_tree.merge(node_processes(HEAD, files / "h"), node_processes(NODE1, files / "n"))
        if not found:
            return []
        left = process_tree.kill(found)
        if left:
            return left
        time.sleep(1)
    return process_tree.alive(found)


def deploy(one_ingress_per_node: bool) -> None:
    args = cpu_demo_args()
    # The chat replica on the worker node, so that its HAProxy runs (Serve starts one on nodes with replicas).
    args["chat_models"][0]["deployment"]["ray_actor_options"]["resources"] = {"node1": 0.01}
    if one_ingress_per_node:
        # One CPU each: two do not fit on one node beside the other replicas.
        args["ingress"].update(num_replicas=2)
        args["ingress"]["ray_actor_options"]["num_cpus"] = 1.0
    else:
        args["ingress"]["ray_actor_options"]["resources"] = {"head": 0.01}
    from ray import serve

    serve.run(bind_graph(parse_config(args)), name="glm-serve", route_prefix="/", blocking=False)
    for ip in (HEAD, NODE1):
        wait_until_healthy(f"http://{ip}:{HTTP_PORT}", 300)


def where_replicas_run() -> dict[str, str]:
    import ray

    found = {}  # Ray's state API would need the dashboard, which the head does not run
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            found[actor["name"].split("#", 1)[1]] = ray._private.state.actors(handle._actor_id.hex())[
                "Address"
            ]["IPAddress"]
    return found


def front_answers(ip: str) -> dict[str, Any]:
    """What one node's front answers on each kind of route."""
    base = f"http://{ip}:{HTTP_PORT}"
    answers: dict[str, Any] = {}
    with httpx.Client(base_url=base, timeout=60) as client:
        for path in ("/-/healthz", "/health", "/", "/v1/models"):
            answers[f"GET {path}"] = client.get(path).status_code
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            events = [line for line in response.iter_lines() if line.startswith("data:")]
            answers["POST /v1/chat/completions (stream)"] = [
                response.status_code,
                events[-1] if events else None,
            ]
        answers["POST /v1/embeddings"] = client.post("/v1/embeddings", json={"input": ["a", "b"]}).status_code
    return answers


def under_load(ip: str, disrupt: Callable[[], object], after_s: float = 20.0) -> dict[str, Any]:
    """4 clients embedding through `ip`'s front; `disrupt()` 5 s in; what they got."""
    outcomes: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post(
                        f"http://{ip}:{HTTP_PORT}/v1/embeddings", json={"input": ["hello there"]}
                    )
                    outcomes[str(response.status_code)] += 1
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(5)
    disrupt()
    time.sleep(after_s)
    stop.set()
    for thread in clients:
        thread.join()
    return dict(outcomes)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--front", choices=["haproxy", "proxy"], default="haproxy", help="the HTTP front")
    haproxy = parser.parse_args().front == "haproxy"
    if os.geteuid() != 0:
        print("needs root (it makes a network namespace)")
        return 2
    import ray

    files = Path(tempfile.mkdtemp(prefix="g2n-", dir="/tmp"))  # short: HAProxy takes socket paths of <= 97
    findings: dict[str, Any] = {"nodes": {"head": HEAD, "worker": NODE1}, "haproxy": haproxy}
    with second_network():
        try:
            head = [RAY, "start", "--head", f"--node-ip-address={HEAD}", f"--port={GCS_PORT}"]
            head += ['--resources={"head": 1}', "--include-dashboard=false"]
            start_node(head, files / "h", head=True, haproxy=haproxy)
            worker = ["ip", "netns", "exec", NAMESPACE, RAY, "start", f"--address={HEAD}:{GCS_PORT}"]
            worker += [f"--node-ip-address={NODE1}", '--resources={"node1": 1}']
            start_node(worker, files / "n", head=False, haproxy=haproxy)
            os.environ.update(RAY_AUTH_MODE="disabled")  # as the nodes: a token in ~/.ray would turn it on
            ray.init(address=f"{HEAD}:{GCS_PORT}", logging_level=logging.ERROR)
            from ray import serve

            serve.start(proxy_location="EveryNode", http_options={"host": "0.0.0.0", "port": HTTP_PORT})
            for layout, per_node in (("one ingress, on the head", False), ("one ingress per node", True)):
                deploy(per_node)
                findings[layout] = {
                    "replicas": where_replicas_run(),
                    "fronts": {ip: front_answers(ip) for ip in (HEAD, NODE1)},
                }
            remote = next(
                name
                for name, ip in where_replicas_run().items()
                if name.startswith("Ingress#") and ip == NODE1
            )

            def kill_remote_ingress() -> None:
                ray.kill(
                    ray.get_actor(f"SERVE_REPLICA::glm-serve#{remote}", namespace="serve"), no_restart=True
                )

            findings["the worker node's ingress replica killed; clients on the head's front"] = under_load(
                HEAD, kill_remote_ingress
            )
            findings["the whole worker node killed; clients on the head's front"] = under_load(
                HEAD, lambda: process_tree.kill(node_processes(NODE1, files / "n"))
            )
        finally:
            ray.shutdown()
            left = end_nodes(files)
    if left:
        print(f"still running: {[process.pid for process in left]}")
        return 1
    # One line, for tests/test_haproxy_two_nodes.py (Ray's log lines share stdout).
    print(json.dumps({"findings": findings}))
    shutil.rmtree(files, ignore_errors=True)  # Ray's and HAProxy's logs: kept only when the run fails
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
