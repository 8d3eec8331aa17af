"""One real Serve instance for the whole test session: the embedded CPU profile on a private Ray."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from serve_app.runtime import free_ports
from tests.secured_app import APP_NAME, SecuredApp, deploy_secured_app


def _free_port() -> int:
    # Above Ray's workers (10002-19999) and HAProxy's ports (runtime.py), below the kernel's ephemeral range.
    # Random order (free_ports): sessions started together on one machine probed the same first port, and Serve's
    # proxies (SO_REUSEPORT) then shared it.
    return free_ports(1, range(28000, 29000))[0]


@pytest.fixture(scope="session")
def tiny_glm_path() -> str:
    from serve_app.tiny_glm import ensure_tiny_glm

    return str(ensure_tiny_glm())


@pytest.fixture(scope="session")
def parts(tiny_glm_path: str) -> tuple[Any, Any, list[int]]:
    """The tiny GLM loaded in-process: (model, tokenizer, end token ids), for tests that drive an engine directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deployments.model_files import end_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_glm_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_glm_path).eval()
    return model, tokenizer, end_token_ids(model.generation_config.eos_token_id, tokenizer)


@pytest.fixture(scope="session")
def base_url(tiny_glm_path: str) -> Iterator[str]:
    from serve_app.builder import bind_graph, parse_config
    from serve_app.profiles import cpu_demo_args
    from serve_app.runtime import serving, stop_on_signals
    from tests.tool_model import tool_model_args

    # Ctrl-C or SIGTERM of the session: pytest ends it and this teardown stops every process of the app within
    # seconds (also while it is still starting); a second signal kills them at once.
    stop_on_signals()
    # The demo profile, plus the tool-calling model the tool tests talk to (a tenth of a CPU).
    args = cpu_demo_args(extra_chat_models=[tool_model_args()])
    if os.environ.get("GLM_SERVE_FRONT_SUBRUN"):  # tests/test_http_fronts.py: the other serving path, whole
        args["handle_transport"] = {"chat": "ray", "embeddings": "grpc", "tokenizer": "ray"}
        args["ingress_render_max_chars"] = 0  # every chat prompt rendered by the tokenizer deployment

    # A private temp dir (short: Ray's socket paths must fit 107 bytes) keeps runs from meeting each other.
    ray_dir = tempfile.mkdtemp(prefix="ray-glm-", dir="/tmp")
    # Metrics reach Ray's exporter every metrics_report_interval_ms (10 s by default): 1 s keeps test_metrics short.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with serving(
        bind_graph(parse_config(args)),
        port=_free_port(),
        healthy_within_s=180,
        _temp_dir=ray_dir,
        num_cpus=os.cpu_count() or 2,
        _system_config={"metrics_report_interval_ms": 1000},
    ) as url:
        yield url


@pytest.fixture(scope="session")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def metrics_url(base_url: str) -> str:
    """The Prometheus endpoint of the session's Ray node (glm-serve's metrics and Ray's)."""
    from serve_app.runtime import metrics_url

    return metrics_url()


@pytest.fixture(scope="session")
def secured(base_url: str) -> Iterator[SecuredApp]:
    """A second ingress over the session app's deployments, at /secured, with API keys, CORS and small limits."""
    from ray import serve

    secured_app = deploy_secured_app("glm-serve", base_url)
    yield secured_app
    serve.delete(APP_NAME)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "disruptive: breaks part of the shared app on purpose; runs last")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)
