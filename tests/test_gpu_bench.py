"""bench/gpu.py on a machine without a GPU: a clear refusal, the GLM-4-9B shape checked on the meta device, and
its whole measuring code path run on a tiny shape on CPU (the GPU run itself needs a GPU: README, GPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_fails() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "torch.cuda.is_available() is False" in done.stderr
    assert done.stdout == ""


def test_the_glm4_9b_shape_is_glm4_9b(gpu_bench: ModuleType) -> None:
    # On the meta device: the real shape with no memory behind it.
    model = gpu_bench.build_model(gpu_bench.GLM4_9B, "meta", torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert 9.3e9 < params < 9.5e9  # GLM-4-9B-chat: 9.40 B
    assert gpu_bench.weight_bytes(model) == 2 * params
    # A batch-1 decode step reads all but the 151552 x 4096 input embedding, plus a little KV cache.
    step = gpu_bench.decode_step_bytes(model, gpu_bench.GLM4_9B)
    embedding = 151552 * 4096 * 2
    assert 2 * params - embedding < step < 2 * params - embedding + 60e6


def test_the_tiny_shape_runs_every_measurement_on_cpu(gpu_bench: ModuleType) -> None:
    shape = gpu_bench.TINY
    model = gpu_bench.build_model(shape, "cpu", torch.float32)
    tokenizer = gpu_bench.synthetic_tokenizer(model.config.vocab_size)
    assert tokenizer.decode([1, 2]) == "t1 t2"
    assert gpu_bench.copy_bandwidth("cpu", shape.copy_bytes, repeats=2) > 0
    assert gpu_bench.nominal_bandwidth("cpu") is None
    short, long = shape.budgets
    for batch in shape.batches:
        engine = gpu_bench.engine_decode(model, tokenizer, shape, batch, "cpu")
        assert engine.tokens == (batch * short, batch * long)  # no end token: every request runs its budget
        assert engine.tokens_per_s > 0
        reference = gpu_bench.transformers_decode(model, shape, batch, "cpu")
        assert 0 < reference.tokens[0] <= reference.tokens[1] <= batch * long
        assert reference.peak_bytes is None  # peak memory is CUDA's figure


def test_the_tiny_run_prints_its_figures(capsys: pytest.CaptureFixture[str], gpu_bench: ModuleType) -> None:
    assert gpu_bench.main(["--tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "batch-1 limit:" in out
    assert out.count("glm-serve engine x") == 2 and out.count("transformers generate_batch x") == 2
    assert "failed" not in out
