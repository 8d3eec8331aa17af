"""Telling an original ChatGLM2/ChatGLM3 folder apart, converting it, and caching the result once per node.

`resolve(path)` is what the deployments call: a folder in the original layout becomes the path of its
converted copy (converted on first use), anything else is returned unchanged for transformers to load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.chatglm.tokenizer import Family, build_tokenizer, end_tokens
from serve_app.chatglm.weights import AttentionShape, convert_weights, source_shards

SUPPORTED = (
    "supported: transformers-native models (e.g. GLM-4, THUDM/glm-4-9b-chat-hf) and original ChatGLM2-6B / "
    "ChatGLM3-6B folders (config.json with model_type 'chatglm', pytorch_model-*.bin or *.safetensors shards, "
    "tokenizer.model), which are converted to GLM-4's native architecture on first use"
)
_MARKER = "chatglm-conversion.json"
# Bumped whenever what `convert` writes changes, so stale cached conversions are redone.
_FORMAT = 1
# Config values the native GLM architecture reproduces; any other value is a variant we cannot convert.
_REQUIRED = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "original_rope": True,
    "apply_residual_connection_post_layernorm": False,
    "add_bias_linear": False,
}


# Hub ids of the original repositories (THUDM/chatglm3-6b, THUDM/chatglm2-6b-int4, ...): their remote code is
# what does not load, so they are converted from a local copy instead.
_ORIGINAL_HUB_ID = re.compile(r"[\w.-]+/chatglm[23]?-6b[\w.-]*", re.IGNORECASE)


class UnsupportedCheckpoint(ValueError):
    """A checkpoint this server cannot load; the message says what it is and what is supported."""


@dataclass(frozen=True)
class ChatGlmCheckpoint:
    folder: Path
    family: Family
    config: dict[str, Any]

    @property
    def num_layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def qkv_bias(self) -> bool:
        return bool(self.config.get("add_qkv_bias", True))

    @property
    def key_value_heads(self) -> int:
        if self.config.get("multi_query_attention", False):
            return int(self.config["multi_query_group_num"])
        return int(self.config["num_attention_heads"])

    @property
    def attention(self) -> AttentionShape:
        head_dim = int(self.config["kv_channels"])
        return AttentionShape(
            query_rows=int(self.config["num_attention_heads"]) * head_dim,
            key_value_rows=self.key_value_heads * head_dim,
        )


def _read_config(folder: Path) -> dict[str, Any] | None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    config: dict[str, Any] = json.loads(config_file.read_text())
    return config


def _family(folder: Path, config: dict[str, Any]) -> Family:
    name = str(config.get("_name_or_path", "")).lower()
    if "chatglm3" in name:
        return "chatglm3"
    if "chatglm2" in name:
        return "chatglm2"
    # Without a telling name, the tokenizer shipped beside the weights says which: only ChatGLM3's knows roles.
    tokenizer_code = folder / "tokenization_chatglm.py"
    if tokenizer_code.is_file():
        return "chatglm3" if "<|observation|>" in tokenizer_code.read_text(errors="replace") else "chatglm2"
    raise UnsupportedCheckpoint(
        f"{folder}: a ChatGLM checkpoint, but neither its config's _name_or_path nor a tokenization_chatglm.py "
        "tells ChatGLM2 from ChatGLM3; set _name_or_path to THUDM/chatglm2-6b or THUDM/chatglm3-6b in its "
        "config.json"
    )


def inspect_checkpoint(folder: Path) -> ChatGlmCheckpoint | None:
    """The original ChatGLM2/3 checkpoint in `folder`; None for anything that is not model_type 'chatglm'.
    Raises UnsupportedCheckpoint for ChatGLM variants that cannot be converted."""
    config = _read_config(folder)
    if config is None or config.get("model_type") != "chatglm":
        return None
    if "position_encoding_2d" in config or "padded_vocab_size" not in config:
        raise UnsupportedCheckpoint(
            f"{folder} is a ChatGLM-6B (first generation) checkpoint: its architecture (2D rotary positions, "
            "bidirectional prefix attention, post-LayerNorm blocks) has no native transformers equivalent and is "
            f"not supported; {SUPPORTED}"
        )
    problems = [
        f"{key}={config.get(key)!r}" for key, value in _REQUIRED.items() if config.get(key, value) != value
    ]
    if config.get("quantization_bit"):
        problems.append(f"quantization_bit={config['quantization_bit']} (quantized weights)")
    if config.get("pre_seq_len"):
        problems.append(f"pre_seq_len={config['pre_seq_len']} (a P-tuning prefix encoder)")
    if config.get("rope_ratio", 1) != 1:
        problems.append(f"rope_ratio={config['rope_ratio']} (the 32k variants' scaled rotary positions)")
    if problems:
        raise UnsupportedCheckpoint(
            f"{folder}: a ChatGLM variant that cannot be converted ({', '.join(problems)}); {SUPPORTED}"
        )
    return ChatGlmCheckpoint(folder=folder, family=_family(folder, config), config=config)


def glm_config(checkpoint: ChatGlmCheckpoint, end_ids: list[int]) -> Any:
    """The GlmConfig of the converted model: RoPE on the first half of each head's channels, interleaved
    pairs, base 10000 (the original's `original_rope`), positions 0..n-1."""
    from transformers import GlmConfig

    c = checkpoint.config
    return GlmConfig(
        vocab_size=int(c["padded_vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["ffn_hidden_size"]),
        num_hidden_layers=checkpoint.num_layers,
        num_attention_heads=int(c["num_attention_heads"]),
        num_key_value_heads=checkpoint.key_value_heads,
        head_dim=int(c["kv_channels"]),
        max_position_embeddings=int(c.get("seq_length", 2048)),
        rms_norm_eps=float(c.get("layernorm_epsilon", 1e-5)),
        attention_bias=checkpoint.qkv_bias,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        pad_token_id=int(c.get("pad_token_id", 0)),
        eos_token_id=end_ids,
        dtype=c.get("torch_dtype", "float16"),
        architectures=["GlmForCausalLM"],
    )


def convert(
    source: Path, output: Path, tokenizer_model: Path | None = None, progress: bool = True
) -> ChatGlmCheckpoint:
    """Write the native GlmForCausalLM folder of the original checkpoint `source` into `output` (made if
    missing). `tokenizer_model` overrides the source's tokenizer.model (ChatGLM2's and ChatGLM3's are the same
    file)."""
    from transformers import GenerationConfig

    checkpoint = inspect_checkpoint(source)
    if checkpoint is None:
        raise UnsupportedCheckpoint(f"{source} is not an original ChatGLM2/ChatGLM3 checkpoint; {SUPPORTED}")
    sentencepiece = tokenizer_model or source / "tokenizer.model"
    if not sentencepiece.is_file():
        raise UnsupportedCheckpoint(f"{source} has no tokenizer.model (the SentencePiece model to convert)")
    output.mkdir(parents=True, exist_ok=True)
    window = int(checkpoint.config.get("seq_length", 2048))
    tokenizer = build_tokenizer(sentencepiece, checkpoint.family, window)
    tokenizer.save_pretrained(output)
    end_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in end_tokens(checkpoint.family)]
    glm_config(checkpoint, end_ids).save_pretrained(output)
    GenerationConfig(eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id).save_pretrained(output)
    convert_weights(
        source, output, checkpoint.attention, checkpoint.num_layers, checkpoint.qkv_bias, progress
    )
    return checkpoint


def _fingerprint(checkpoint: ChatGlmCheckpoint) -> str:
    """Changes when the source's config or weight files change (size and mtime), or the converter does."""
    digest = hashlib.sha256(f"{_FORMAT}\n{checkpoint.folder.resolve()}\n".encode())
    digest.update(json.dumps(checkpoint.config, sort_keys=True).encode())
    for path in [*source_shards(checkpoint.folder), checkpoint.folder / "tokenizer.model"]:
        if path.exists():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def ensure_converted(checkpoint: ChatGlmCheckpoint, cache_root: Path, progress: bool = True) -> Path:
    """The converted folder of `checkpoint` under `cache_root`, converting it first if no one has. Replicas on
    one node share the cache; a file lock makes the second wait for the first's result instead of converting
    again, and a folder is only renamed into place once complete."""
    from filelock import FileLock

    folder = cache_root / f"{checkpoint.folder.name}-{_fingerprint(checkpoint)}"
    if (folder / _MARKER).exists():
        return folder
    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / _MARKER).exists():
            return folder
        staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=cache_root))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the result from replicas running as another user
        try:
            started = time.perf_counter()
            convert(checkpoint.folder, staging, progress=progress)
            record = {
                "source": str(checkpoint.folder),
                "family": checkpoint.family,
                "format": _FORMAT,
                "seconds": round(time.perf_counter() - started, 2),
            }
            (staging / _MARKER).write_text(json.dumps(record))
            if folder.exists():  # without a marker: not ours to keep (made by hand, or by an older layout)
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def resolve(path: str, cache_root: Path) -> str:
    """What to load for a configured model path: the converted copy of an original ChatGLM2/3 folder, the path
    itself otherwise (a native folder or a hub id). Raises UnsupportedCheckpoint for ChatGLM variants."""
    folder = Path(path)
    if not folder.is_dir():
        if _ORIGINAL_HUB_ID.fullmatch(path):
            raise UnsupportedCheckpoint(
                f"{path} is an original ChatGLM repository, which needs its own remote code: download it "
                f"(huggingface-cli download {path} --local-dir DIR) and set path to DIR, which is then "
                f"converted on first use; {SUPPORTED}"
            )
        return path
    checkpoint = inspect_checkpoint(folder)
    if checkpoint is None:
        return path
    return str(ensure_converted(checkpoint, cache_root))
