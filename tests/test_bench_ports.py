"""The benchmarks refuse to start a server on a port something else holds: their readiness check would take that
listener's answers for their own server's, and measure it."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize(
    "command",
    [
        ["embeddings.py", "--only", "glm", "--concurrency", "1", "--per-request", "1"],
        ["chat.py", "--only", "glm", "--concurrency", "1", "--rates", ""],
    ],
    ids=["embeddings", "chat"],
)
def test_a_benchmark_refuses_a_port_in_use(held_port: int, command: list[str], tmp_path: Path) -> None:
    script, *options = command
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / script),
            *options,
            "--port",
            str(held_port),
            "--output",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode != 0
    assert f"PortInUse: 127.0.0.1:{held_port} is already in use" in done.stderr
    assert "starting glm-serve" in done.stdout  # refused at the server's start, not before
    assert not (tmp_path / "r.json").exists()  # no figures
