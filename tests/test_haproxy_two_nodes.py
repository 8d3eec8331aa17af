"""The HTTP fronts on two Ray nodes, each in a network namespace of its own (k8s/haproxy_two_nodes.py, ~100 s per
front): HAProxy, and Serve's proxy as the KubeRay profile runs it.

Each node's front serves every route, wherever the ingress replicas run; losing the other node's ingress replica,
or the whole node, costs at most the requests in flight there. Needs root and `ip` (it makes a network namespace):
skipped without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCENARIO = Path(__file__).resolve().parents[1] / "k8s" / "haproxy_two_nodes.py"
LAYOUTS = ["one ingress, on the head", "one ingress per node"]
DISRUPTIONS = [
    "the worker node's ingress replica killed; clients on the head's front",
    "the whole worker node killed; clients on the head's front",
]

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 (a network namespace for the second node)",
)


@pytest.fixture(scope="module", params=["haproxy", "proxy"])
def findings(request: pytest.FixtureRequest) -> dict[str, Any]:
    command = [sys.executable, str(SCENARIO), "--front", request.param]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith('{"findings"'))
    return json.loads(line)["findings"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_nodes_front_serves_every_route(findings: dict[str, Any], layout: str) -> None:
    fronts = findings[layout]["fronts"]
    assert set(fronts) == set(findings["nodes"].values())
    for answers in fronts.values():
        assert answers == {
            "GET /-/healthz": 200,  # KubeRay's readiness probe of each pod
            "GET /health": 200,
            "GET /": 200,
            "GET /v1/models": 200,
            "POST /v1/chat/completions (stream)": [200, "data: [DONE]"],
            "POST /v1/embeddings": 200,
        }


def test_the_layouts_put_the_ingress_where_they_say(findings: dict[str, Any]) -> None:
    nodes = findings["nodes"]
    for layout, ingress_nodes in zip(LAYOUTS, [[nodes["head"]], sorted(nodes.values())], strict=True):
        replicas = findings[layout]["replicas"]
        assert sorted(ip for name, ip in replicas.items() if name.startswith("Ingress#")) == ingress_nodes
        # The chat replica on the worker node: its front is one of a node that runs no ingress in the first layout.
        assert [ip for name, ip in replicas.items() if name.startswith("Chat-")] == [nodes["worker"]]


@pytest.mark.parametrize("disruption", DISRUPTIONS)
def test_a_lost_ingress_or_node_costs_only_the_requests_in_flight_there(
    findings: dict[str, Any], disruption: str
) -> None:
    outcomes = dict(findings[disruption])
    served = outcomes.pop("200", 0)
    assert served >= 100, findings[disruption]
    # 4 clients: the requests they had on the lost ingress, and the few sent before the front heard of the loss.
    assert sum(outcomes.values()) <= 8, findings[disruption]
