"""Both serving paths (README "The serving path"): the session is served behind HAProxy, the default of local
starts when it is installed, with the default `handle_transport` (chat and tokenizer over gRPC, embeddings over
Ray actor calls); the HTTP surface runs again behind Serve's Python proxy with every kind on the other transport
and every chat prompt rendered by the tokenizer deployment, not the ingress (tests/conftest.py), in a pytest run
of its own (the front is chosen when Ray starts, once per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest

from serve_app.runtime import HA_PROXY, haproxy_installed

ROOT = Path(__file__).resolve().parents[1]
# What a client meets at the front: streaming and SSE (the SDK, the seeds' event streams), back-pressure 503s
# (refused at the ingress and in the replica), /health, the web page, API keys, metrics, embeddings.
HTTP_SURFACE = [
    "tests/test_http_fronts.py",
    "tests/test_openai_chat.py",
    "tests/test_seed_web_demo.py",
    "tests/test_backpressure.py",
    "tests/test_models_tokenize_health.py",
    "tests/test_web_page.py",
    "tests/test_auth.py",
    "tests/test_metrics.py",
    "tests/test_embeddings.py",
]
SUBRUN = "GLM_SERVE_FRONT_SUBRUN"


def _listener(port: int) -> str:
    """The name of the process listening on 127.0.0.1:port."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return psutil.Process(connection.pid).name()
    raise AssertionError(f"nothing listens on port {port}")


def test_the_session_listens_through_the_front_its_switch_chose(base_url: str) -> None:
    port = urlparse(base_url).port
    assert port is not None
    if os.environ.get(SUBRUN):
        assert os.environ[HA_PROXY] == "0"  # the run's switch was honoured
    expected = "haproxy" if os.environ[HA_PROXY] == "1" else "ray::ProxyActor"
    assert _listener(port).startswith(expected[:15])  # a process name holds at most 15 characters


@pytest.mark.skipif(bool(os.environ.get(SUBRUN)), reason="this is that run")
@pytest.mark.skipif(
    not haproxy_installed(), reason="no HAProxy here: the session itself runs behind Serve's proxy"
)
def test_the_http_surface_holds_behind_serves_python_proxy_too() -> None:
    env = dict(os.environ, **{HA_PROXY: "0", SUBRUN: "1"})
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *HTTP_SURFACE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout.splitlines()[-1], run.stdout[-2000:]
