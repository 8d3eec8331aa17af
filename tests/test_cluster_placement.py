"""The graph on a simulated GPU cluster: placement, a replica that fits nowhere, and autoscaling both ways.

The cluster runs in a child process (tests/cluster_scenario.py, once for the module): this test process already
holds the session's Ray. Its findings are facts read from Ray and Serve; the seconds it measured are not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _free_port

SCENARIO = Path(__file__).with_name("cluster_scenario.py")
CHAT = "Chat-tiny-glm"
EMBEDDING = "Embedding-all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def findings() -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, str(SCENARIO), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Ray's own log lines share the child's stdout: the findings are the one JSON line.
    line = next(line for line in run.stdout.splitlines() if line.startswith('{"findings"'))
    return json.loads(line)["findings"]  # type: ignore[no-any-return]


def test_chat_replicas_land_on_gpu_nodes_and_run_on_cpu(findings: dict[str, Any]) -> None:
    act = findings["placement"]
    placement = act["placement"]
    assert placement[CHAT] == [True, True]  # one replica per declared GPU
    for deployment in (EMBEDDING, "Tokenizer", "Ingress"):
        assert placement[deployment] and not any(placement[deployment]), (deployment, placement)
    # The declared GPUs have no CUDA behind them: the chat code ran on CPU and answered.
    assert act["chat_status"] == 200 and act["chat"]["usage"]["completion_tokens"] == 4


def test_a_replica_that_fits_nowhere_is_reported_while_the_others_serve(findings: dict[str, Any]) -> None:
    act = findings["unschedulable"]
    assert act["flagged_after_s"] is not None, act  # Serve said so, rather than waiting silently
    assert act["status"] == "UPDATING"
    assert "to be scheduled" in act["message"] and "GPU" in act["message"], act["message"]
    assert act["replica_states"].get("RUNNING") == 2 and act["replica_states"].get("STARTING") == 1
    assert act["serving_status"] == 200


def test_load_scales_chat_and_embeddings_to_max_and_idleness_back_to_min(findings: dict[str, Any]) -> None:
    act = findings["autoscaling"]
    assert act["settled_at_min"], act
    assert act["up_s"][CHAT] is not None and act["up_s"][EMBEDDING] is not None, act
    assert act["down_s"][CHAT] is not None and act["down_s"][EMBEDDING] is not None, act
    assert act["final"] == {CHAT: 1, EMBEDDING: 1}
    for statuses in act["load_statuses"]:
        assert set(statuses) == {"200"}, act["load_statuses"]  # scaling drops no request
