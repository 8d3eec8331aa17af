"""Time and peak memory (RSS) of converting an original ChatGLM checkpoint to native GLM.

    python bench/chatglm_convert.py                       # the tiny fixtures (shared/fixtures/chatglm)
    python bench/chatglm_convert.py --synthetic-layers 4  # ChatGLM3-6B's real widths, 4 of its 28 layers

The synthetic checkpoint has the real model's shapes (hidden 4096, ffn 13696, 32 heads x 128, 2 KV groups,
vocab 65024), float16 random weights, in pickled `pytorch_model-0000N-of-0000M.bin` shards of about the real
shards' size (~1.9 GB): peak RSS is then what converting the real one costs, and the time per GB scales to it.
Each conversion runs in a child process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "chatglm"
_CHILD = """
import sys, threading, time
from pathlib import Path
from serve_app.chatglm.checkpoint import convert

peak_anon = 0

def sample():
    # RssAnon: memory the process owns; pages of a memory-mapped shard are file-backed (RssFile), which the
    # kernel can drop under pressure and re-read, so they count in the peak RSS but are not a hard need.
    global peak_anon
    while True:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    peak_anon = max(peak_anon, int(line.split()[1]))
        time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()
started = time.perf_counter()
tokenizer = Path(sys.argv[3]) if len(sys.argv) > 3 else None
convert(Path(sys.argv[1]), Path(sys.argv[2]), tokenizer, progress=False)
print(time.perf_counter() - started, peak_anon / 1024)
"""
_BASELINE = "import torch, transformers, tokenizers, safetensors, serve_app.chatglm.checkpoint"


def _child(code: str, *args: str) -> tuple[str, float]:
    """Run `code` in a fresh interpreter; returns its stdout and its peak RSS in MiB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, cwd=REPO
    )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest child so far: run the small (baseline) child first.
    return out.stdout.strip(), max(peak, before) / 1024


def _synthetic(folder: Path, layers: int, shard_bytes: float) -> float:
    """A ChatGLM3-6B-shaped original checkpoint with `layers` layers; returns its size in GB."""
    import torch

    hidden, ffn, heads, head_dim, groups, vocab = 4096, 13696, 32, 128, 2, 65024
    config = json.loads((FIXTURES / "chatglm3-tiny" / "config.json").read_text())
    config.update(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        kv_channels=head_dim,
        multi_query_group_num=groups,
        padded_vocab_size=vocab,
        seq_length=8192,
        torch_dtype="float16",
    )
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.model").write_bytes((FIXTURES / "chatglm3-tiny" / "tokenizer.model").read_bytes())
    qkv = heads * head_dim + 2 * groups * head_dim
    shapes: dict[str, tuple[int, ...]] = {"transformer.embedding.word_embeddings.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attention.query_key_value.weight": (qkv, hidden),
            p + "self_attention.query_key_value.bias": (qkv,),
            p + "self_attention.dense.weight": (hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.dense_h_to_4h.weight": (2 * ffn, hidden),
            p + "mlp.dense_4h_to_h.weight": (hidden, ffn),
        }
    shapes |= {
        "transformer.encoder.final_layernorm.weight": (hidden,),
        "transformer.output_layer.weight": (vocab, hidden),
    }
    groups_of: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if size and size + nbytes > shard_bytes:
            groups_of.append([])
            size = 0
        groups_of[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for number, names in enumerate(groups_of, start=1):
        file_name = f"pytorch_model-{number:05d}-of-{len(groups_of):05d}.bin"
        shard = {n: (torch.randn(shapes[n]) * 0.02).half() for n in names}
        torch.save(shard, folder / file_name)
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map |= dict.fromkeys(names, file_name)
        del shard
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total / 1e9


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--synthetic-layers", type=int, default=0, help="0: the tiny fixtures")
    parser.add_argument("--shard-gb", type=float, default=1.9)
    args = parser.parse_args()
    _, baseline = _child(_BASELINE)
    print(f"baseline (imports only): peak RSS {baseline:.0f} MiB")
    with tempfile.TemporaryDirectory(prefix="chatglm-bench-") as tmp:
        root = Path(tmp)
        if args.synthetic_layers:
            gigabytes = _synthetic(root / "original", args.synthetic_layers, args.shard_gb * 1e9)
            out, peak = _child(_CHILD, str(root / "original"), str(root / "native"))
            seconds, anon = map(float, out.split())
            print(
                f"synthetic ChatGLM3-6B widths, {args.synthetic_layers} layers, {gigabytes:.2f} GB fp16 in "
                f"{args.shard_gb} GB shards: {seconds:.1f} s ({gigabytes / seconds:.2f} GB/s), "
                f"peak RSS {peak:.0f} MiB (anonymous {anon:.0f} MiB)"
            )
            return 0
        for name in ("chatglm3-tiny", "chatglm2-tiny"):
            tokenizer = str(FIXTURES / "chatglm3-tiny" / "tokenizer.model")
            out, peak = _child(_CHILD, str(FIXTURES / name), str(root / name), tokenizer)
            seconds, anon = map(float, out.split())
            print(f"{name}: {seconds:.2f} s, peak RSS {peak:.0f} MiB (anonymous {anon:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
