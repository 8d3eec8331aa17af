"""What this session's Serve replicas wrote to their log files (Ray's logs folder, `serve/`)."""

from __future__ import annotations

import re
from pathlib import Path

import ray

# Serve's line for an exception a replica raised: "... <replica id> <request id> -- Request failed."
_FAILED = re.compile(r" ([0-9a-f-]{36}) -- Request failed")


def failed_requests_logged(deployment: str) -> set[str]:
    """The ids of the requests that the deployment's replicas (dead ones too) logged as failed."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    failed: set[str] = set()
    for log in logs.glob(f"replica_glm-serve_{deployment}_*.log"):
        failed.update(_FAILED.findall(log.read_text(errors="replace")))
    return failed
