"""Streaming conversion of ChatGLM2/3 weights to GlmForCausalLM's names and layout.

One source shard is read at a time and written out as one safetensors shard before the next is read, tensor by
tensor: the fused projections are split into row slices, which are views, so the memory held is one source
shard plus the bytes of the tensor being written. Tensors keep their stored dtype (float16 for the real
checkpoints); the loader casts to the configured dtype.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_INDEX = "pytorch_model.bin.index.json"
_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
# A buffer the original recomputes and never reads.
_DROPPED = {"transformer.rotary_pos_emb.inv_freq"}
_TOP_LEVEL = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_IN_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    # Rows: the SiLU-gated half first, then the linear half: GLM's gate_up_proj has the same order.
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_FUSED_QKV = "self_attention.query_key_value."
_SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int8": "I8",
    "uint8": "U8",
    "int32": "I32",
    "int64": "I64",
}


class CheckpointError(ValueError):
    """The weights do not match the config, or hold tensors this converter does not know."""


@dataclass(frozen=True)
class AttentionShape:
    """How the fused query_key_value rows split: all query heads, then the key and value groups."""

    query_rows: int
    key_value_rows: int

    def split(self, fused: Any) -> tuple[Any, Any, Any]:
        expected = self.query_rows + 2 * self.key_value_rows
        if fused.shape[0] != expected:
            raise CheckpointError(f"query_key_value has {fused.shape[0]} rows, the config implies {expected}")
        q_end = self.query_rows
        k_end = q_end + self.key_value_rows
        return fused[:q_end], fused[q_end:k_end], fused[k_end:]


def source_shards(folder: Path) -> list[Path]:
    """The weight files of an original checkpoint, in index order: safetensors preferred over pickles."""
    for index_name, single in (
        (_SAFETENSORS_INDEX, "model.safetensors"),
        (_PICKLE_INDEX, "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        if (folder / single).exists():
            return [folder / single]
    raise CheckpointError(
        f"{folder} has no weights: expected model.safetensors, pytorch_model.bin or a sharded index "
        f"({_SAFETENSORS_INDEX} / {_PICKLE_INDEX})"
    )


def read_shard(path: Path) -> Iterator[tuple[str, Any]]:
    """The tensors of one shard. Pickles load with weights_only=True (no code runs) and mmap where possible."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, shard.get_tensor(name)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) pickle cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    yield from state.items()


def native_tensors(name: str, tensor: Any, attention: AttentionShape) -> list[tuple[str, Any]]:
    """The GlmForCausalLM tensors that one original tensor becomes (none for the dropped buffer)."""
    if name in _DROPPED:
        return []
    if name in _TOP_LEVEL:
        return [(_TOP_LEVEL[name], tensor)]
    match = _LAYER.fullmatch(name)
    if match is None:
        raise CheckpointError(f"unknown tensor {name!r}: not a ChatGLM2/ChatGLM3 parameter")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest in _IN_LAYER:
        return [(prefix + _IN_LAYER[rest], tensor)]
    kind = rest.removeprefix(_FUSED_QKV)
    if rest.startswith(_FUSED_QKV) and kind in ("weight", "bias"):
        q, k, v = attention.split(tensor)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v), strict=True)]
    raise CheckpointError(f"unknown tensor {name!r}: not a ChatGLM2/ChatGLM3 parameter")


def expected_names(num_layers: int, qkv_bias: bool) -> set[str]:
    names = set(_TOP_LEVEL.values())
    per_layer = [*_IN_LAYER.values(), *(f"self_attn.{p}_proj.weight" for p in "qkv")]
    if qkv_bias:
        per_layer += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    for layer in range(num_layers):
        names.update(f"model.layers.{layer}.{n}" for n in per_layer)
    return names


def write_safetensors(path: Path, tensors: list[tuple[str, Any]]) -> int:
    """Write `tensors` to `path` one at a time (no second copy of the shard); returns the bytes of data."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: dtype {dtype} cannot be written")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for _, tensor in tensors:
            flat = tensor.contiguous().reshape(-1).view(torch.uint8)
            out.write(memoryview(flat.numpy()))
    return offset


def convert_weights(
    folder: Path,
    output: Path,
    attention: AttentionShape,
    num_layers: int,
    qkv_bias: bool,
    progress: bool = True,
) -> list[str]:
    """Convert every shard of `folder` into `output`; returns the written file names."""
    from tqdm import tqdm

    shards = source_shards(folder)
    written: set[str] = set()
    weight_map: dict[str, str] = {}
    total_bytes = 0
    files: list[str] = []
    for number, shard in enumerate(shards, start=1):
        out_name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        )
        converted: list[tuple[str, Any]] = []
        bar = tqdm(desc=f"shard {number}/{len(shards)} {shard.name}", unit="tensor", disable=not progress)
        with bar:
            for name, tensor in read_shard(shard):
                for native_name, native in native_tensors(name, tensor, attention):
                    if native_name in written:
                        raise CheckpointError(f"{native_name} appears twice (second time in {shard.name})")
                    written.add(native_name)
                    converted.append((native_name, native))
                bar.update()
            total_bytes += write_safetensors(output / out_name, converted)
        weight_map.update(dict.fromkeys((n for n, _ in converted), out_name))
        files.append(out_name)
        del converted
    missing = expected_names(num_layers, qkv_bias) - written
    if missing:
        raise CheckpointError(f"{folder} misses {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (output / _SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        files.append(_SAFETENSORS_INDEX)
    return files
