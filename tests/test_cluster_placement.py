"""GPU-pinned placement on a simulated cluster: chat replicas only on GPU nodes, the rest on the CPU head.

The cluster runs in a child process (tests/cluster_scenario.py): this test process already holds the session's Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import _free_port

SCENARIO = Path(__file__).with_name("cluster_scenario.py")


def test_chat_replicas_land_on_gpu_nodes_and_run_on_cpu() -> None:
    port = _free_port()
    run = subprocess.run(
        [sys.executable, str(SCENARIO), str(port)], capture_output=True, text=True, timeout=400, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Ray's own log lines share the child's stdout: the result is the one JSON line.
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith('{"placement"')))
    placement = result["placement"]
    assert placement["Chat-tiny-glm"] == [True, True]  # one replica per declared GPU
    for deployment in ("Embedding-all-MiniLM-L6-v2", "Tokenizer", "Ingress"):
        assert placement[deployment] and not any(placement[deployment]), (deployment, placement)
    # The declared GPUs have no CUDA behind them: the chat code ran on CPU and answered.
    assert result["chat_status"] == 200 and result["chat"]["usage"]["completion_tokens"] == 4
