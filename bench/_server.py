"""The benchmarks' server subprocesses end for good, also when a benchmark fails or is interrupted.

A server is started with `start_new_session=True`: its session id is its PID, and so is that of everything it
starts (Ray's GCS, raylet, workers, agents), even after their parent died. Stopping: SIGTERM, then SIGKILL for
whatever of its process tree or session is left. All by PID (psutil), never by name: other Ray clusters may run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_app import process_tree
from serve_app.runtime import check_port_free


def _session(sid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                members.append(process)
        except (OSError, psutil.Error):
            continue
    return members


def launch_server(command: list[str], env: Mapping[str, str], port: int, log_path: Path) -> subprocess.Popen:
    """Start a server subprocess in a session of its own, its output to `log_path`. Refused (PortInUse) while
    something else listens on `port`: the benchmark's readiness check would take that server's 200 for this one's,
    and measure it."""
    check_port_free("127.0.0.1", port)
    log = open(log_path, "w")  # noqa: SIM115 - the child writes to it for its whole life
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM the server (glm-serve stops in seconds; a peer may take longer), then SIGKILL what is left of
    its tree (collected before the signal) and of its session."""
    tree = process_tree.descendants([psutil.Process(proc.pid)]) if proc.poll() is None else []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    left = process_tree.kill(process_tree.merge(tree, _session(proc.pid)))
    if left:
        print(f"  (processes of the server that survived SIGKILL: {[p.pid for p in left]})", flush=True)


def interrupt_on_sigterm() -> None:
    """SIGTERM of a benchmark ends it like Ctrl-C: its `finally` blocks stop the servers it started."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def add_transport_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--handle-transport",
        choices=["grpc", "ray"],
        default=None,
        help="how glm-serve's ingress calls every deployment (config handle_transport; default: the profile's, "
        "chat and tokenizer grpc, embeddings ray)",
    )


def every_kind(transport: str) -> dict[str, str]:
    """The handle_transport config that calls every kind of deployment over `transport`."""
    return {"chat": transport, "embeddings": transport, "tokenizer": transport}
