"""`glm-serve demo` stops for good: SIGTERM ends every process it started within 5 s (mid-stream, with a hung
replica, while still starting), and a port already in use is a one-line error before Ray starts.

Each test runs the real command in a subprocess, on a free port, with its own Ray temp dir and the session's tiny
GLM folder. The process tree is collected by PID (the demo and its descendants, psutil) just before the signal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from serve_app import process_tree
from tests.conftest import _free_port

GLM_SERVE = str(Path(sys.executable).with_name("glm-serve"))
STOP_WITHIN_S = 5.0


class Demo:
    """`glm-serve demo` in a subprocess; output in a file."""

    def __init__(self, cache_dir: Path, port: int, workdir: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "demo.log"
        self.ray_dir = Path(tempfile.mkdtemp(prefix="ray-glm-", dir="/tmp"))  # short: Ray's socket paths
        env = dict(os.environ, RAY_TMPDIR=str(self.ray_dir), PYTHONUNBUFFERED="1")
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [GLM_SERVE, "demo", "--port", str(port), "--cache-dir", str(cache_dir)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.root = psutil.Process(self.process.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tree(self) -> list[psutil.Process]:
        return process_tree.descendants([self.root])

    def titles(self) -> list[str]:
        titles = []
        for process in self.tree():
            try:
                titles.append(" ".join(process.cmdline()))
            except psutil.Error:
                continue
        return titles

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 240) -> None:
        """Until `condition`; fails at once, with the log's tail, if the demo exits first."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.process.poll() is None, f"the demo exited waiting for {what}: {self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
            time.sleep(0.1)

    def wait_ready(self) -> None:
        self.wait_for(lambda: "glm-serve is ready" in self.log(), "the demo")

    def sigterm_and_time(self) -> tuple[float, list[psutil.Process]]:
        """SIGTERM; the seconds until the demo and every process of its tree (collected just before) are gone."""
        tree = self.tree()
        assert len(tree) > 3, [p.name() for p in tree]  # the demo, GCS, raylet, workers...
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        deadline = started + 30
        while process_tree.alive(tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.process.wait(timeout=5)
        return time.monotonic() - started, process_tree.alive(tree)

    def clean_up(self) -> None:
        process_tree.kill(self.tree())
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def demo(tiny_glm_path: str, tmp_path: Path) -> Iterator[Callable[[], Demo]]:
    started: list[Demo] = []

    def start() -> Demo:
        started.append(Demo(Path(tiny_glm_path).parent, _free_port(), tmp_path))
        return started[-1]

    yield start
    for one in started:  # a failed test must not leave a server behind
        one.clean_up()


def _assert_stopped_cleanly(demo: Demo, took_s: float, left: list[psutil.Process]) -> None:
    print(f"process tree gone {took_s:.1f} s after SIGTERM")
    assert not left, [(p.pid, p.name()) for p in left]
    assert took_s < STOP_WITHIN_S, f"{took_s:.1f} s"
    assert demo.process.returncode == 0, demo.log()[-3000:]
    tail = demo.log().split("Ctrl-C stops.")[-1]
    assert "Traceback" not in tail and "failed to shut down" not in tail, tail[-3000:]


def test_sigterm_mid_stream_with_a_hung_replica_ends_the_stream_and_every_process(
    demo: Callable[[], Demo],
) -> None:
    server = demo()
    server.wait_ready()
    # Replicas that no longer answer anything (stopped, as hung processes would be) must not hold the stop.
    hung = [p for p in server.tree() if "ServeReplica:glm-serve:Embedding" in " ".join(p.cmdline())]
    assert hung
    for process in hung:
        process.suspend()
    # Greedy on this prompt the tiny model runs to max_tokens: the stream is still going at the signal.
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2000,
        "stream": True,
        "temperature": 0,
    }
    events: list[str] = []
    took_s, left = 0.0, list[psutil.Process]()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line:
                continue
            events.append(line)
            if len(events) == 1:
                took_s, left = server.sigterm_and_time()
    assert events[-1] == "data: [DONE]", events[-3:]
    error = json.loads(events[-2].removeprefix("data: ")).get("error")
    assert error is not None, f"the stream ended before the stop: {events[-3:]}"
    assert error["type"] == "server_error" and error["message"], error
    _assert_stopped_cleanly(server, took_s, left)


def test_sigterm_while_starting_ends_every_process(demo: Callable[[], Demo]) -> None:
    server = demo()
    # Ray is up and Serve is deploying the app: some replica process exists, /health is not yet 200.
    server.wait_for(
        lambda: any("SERVE_REPLICA::" in t or "ServeReplica:" in t for t in server.titles()), "a replica"
    )
    assert "glm-serve is ready" not in server.log()
    took_s, left = server.sigterm_and_time()
    _assert_stopped_cleanly(server, took_s, left)


def test_a_port_in_use_is_one_line_before_ray_starts(tiny_glm_path: str, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ray_dir = tmp_path / "ray"
        ray_dir.mkdir()
        env = dict(os.environ, RAY_TMPDIR=str(ray_dir))
        command = [GLM_SERVE, "demo", "--port", str(port), "--cache-dir", str(Path(tiny_glm_path).parent)]
        done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port} is already in use" in lines[0], done.stderr
    assert list(ray_dir.iterdir()) == []  # Ray never started
