"""Health of a model replica, shared by the chat and embedding deployments.

Serve calls a replica's `check_health` every `health_check_period_s`; when it raises (or outlives
`health_check_timeout_s`) three times in a row, Serve stops the replica and starts another. A model that still
answers but computes NaN (corrupted weights, a failing accelerator) is as broken as one that raises, so the probe
checks that a tiny forward pass gives finite numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def require_finite(values: Any, what: str) -> None:
    """Raise if a probe's output (a torch tensor or a numpy array) holds NaN or infinity."""
    array = values.detach().float().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
    if not np.isfinite(array).all():
        raise RuntimeError(f"{what} gave non-finite values: the model is broken")


def poison_weights(model: Any) -> dict[str, Any]:
    """Overwrite every floating-point weight with NaN: a real fault, for the tests that check a broken model is
    detected and its replica replaced. Returns which replica this is (Serve's id, the end of its actor's name: a
    test breaking every replica of a deployment calls until it has seen each) and how many tensors were poisoned."""
    import torch
    from ray import serve

    poisoned = 0
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point():
                parameter.fill_(float("nan"))
                poisoned += 1
    return {"replica": serve.get_replica_context().replica_id.unique_id, "tensors": poisoned}
