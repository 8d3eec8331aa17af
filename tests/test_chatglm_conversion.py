"""Original ChatGLM2/3 checkpoints converted to GlmForCausalLM give the original code's logits and greedy text,
from every shard layout the real checkpoints come in; variants we cannot convert are refused by name."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from serve_app.chatglm.checkpoint import (
    UnsupportedCheckpoint,
    convert,
    ensure_converted,
    inspect_checkpoint,
    resolve,
)
from serve_app.chatglm.weights import CheckpointError
from tests.chatglm_fixtures import (
    CHATGLM2,
    CHATGLM3,
    TOKENIZER_MODEL,
    original_copy,
    reference,
    require_fixtures,
)

pytestmark = pytest.mark.usefixtures("fixtures_present")


@pytest.fixture(scope="module")
def fixtures_present() -> None:
    require_fixtures()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_fixtures()
    root = tmp_path_factory.mktemp("converted")
    for source in (CHATGLM3, CHATGLM2):
        convert(source, root / source.name, tokenizer_model=TOKENIZER_MODEL, progress=False)
    return {"chatglm3": root / CHATGLM3.name, "chatglm2": root / CHATGLM2.name}


def _close(actual: float, expected: float) -> bool:
    return abs(actual - expected) <= 1e-4 * max(1.0, abs(expected))


def _load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("family, source", [("chatglm3", CHATGLM3), ("chatglm2", CHATGLM2)])
def test_converted_model_gives_the_reference_logits_and_greedy_text(
    converted: dict[str, Path], family: str, source: Path
) -> None:
    model = _load(converted[family])
    assert type(model).__name__ == "GlmForCausalLM"
    ref = reference(source)
    fixed_ids = ref["logits_fixed_ids"]
    for name, prompt in ref["prompts"].items():
        input_ids = torch.tensor([prompt["input_ids"]])
        with torch.inference_mode():
            logits = model(input_ids).logits[0].double()
        last = logits[-1]
        top = last.topk(20)
        assert top.indices.tolist() == [i for i, _ in prompt["last_logits_top20"]], name
        assert all(
            _close(a, b) for a, (_, b) in zip(top.values.tolist(), prompt["last_logits_top20"], strict=True)
        )
        assert all(_close(last[i].item(), prompt["last_logits_at_fixed_ids"][str(i)]) for i in fixed_ids), (
            name
        )
        assert _close(last.sum().item(), prompt["last_logits_sum"]), name
        assert _close(last.norm().item(), prompt["last_logits_l2"]), name
        assert logits.argmax(-1).tolist() == prompt["argmax_per_position"], name
        maxima = logits.max(-1).values.tolist()
        assert all(_close(a, b) for a, b in zip(maxima, prompt["max_logit_per_position"], strict=True)), name
        generated = model.generate(input_ids, do_sample=False, max_new_tokens=24, min_new_tokens=24)
        assert generated[0, input_ids.shape[1] :].tolist() == prompt["greedy_24_use_cache"], name


def test_converted_config_is_native_glm_with_each_models_end_tokens(converted: dict[str, Path]) -> None:
    chatglm3 = json.loads((converted["chatglm3"] / "config.json").read_text())
    chatglm2 = json.loads((converted["chatglm2"] / "config.json").read_text())
    assert chatglm3["model_type"] == chatglm2["model_type"] == "glm"
    assert "auto_map" not in chatglm3
    assert chatglm3["eos_token_id"] == [2, 64795, 64797]  # eos, <|user|>, <|observation|>
    assert chatglm2["eos_token_id"] == [2]
    # hidden_size 16 while heads x head_dim = 64; one key/value group.
    assert (chatglm2["hidden_size"], chatglm2["head_dim"], chatglm2["num_key_value_heads"]) == (16, 16, 1)
    assert chatglm3["rope_parameters"]["partial_rotary_factor"] == 0.5
    # Stored float16 like the real ChatGLM2-6B: kept so, and cast when loaded.
    from safetensors import safe_open

    with safe_open(str(converted["chatglm2"] / "model.safetensors"), framework="pt") as weights:
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.float16


def _fixture_tensors(source: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(source / "model.safetensors"))


def _write_sharded(source: Path, destination: Path, pickled: bool) -> Path:
    """The fixture's tensors in the real checkpoints' layouts: 3 pickled `pytorch_model-0000N-of-00003.bin`
    shards (torch.save) or 3 safetensors shards, each with its index."""
    from safetensors.torch import save_file

    folder = original_copy(source, destination)
    (folder / "model.safetensors").unlink()
    tensors = _fixture_tensors(source)
    names = list(tensors)
    shards = [names[i::3] for i in range(3)]
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        stem = "pytorch_model" if pickled else "model"
        file_name = f"{stem}-{number:05d}-of-00003.{'bin' if pickled else 'safetensors'}"
        part = {n: tensors[n].clone() for n in shard}
        if pickled:
            torch.save(part, folder / file_name)
        else:
            save_file(part, str(folder / file_name))
        weight_map.update(dict.fromkeys(shard, file_name))
    index = "pytorch_model.bin.index.json" if pickled else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _native_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    return {name: tensor for f in files for name, tensor in load_file(str(f)).items()}


@pytest.mark.parametrize("pickled", [True, False], ids=["pytorch_model-bin-shards", "safetensors-shards"])
@pytest.mark.parametrize("source", [CHATGLM3, CHATGLM2], ids=["chatglm3", "chatglm2"])
def test_sharded_layouts_convert_to_identical_weights(
    converted: dict[str, Path], tmp_path: Path, source: Path, pickled: bool
) -> None:
    sharded = _write_sharded(source, tmp_path / "original", pickled)
    convert(sharded, tmp_path / "native", progress=False)
    # One output shard per source shard, with an index: memory stays at one shard.
    index = json.loads((tmp_path / "native" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    expected = _native_weights(converted["chatglm3" if source == CHATGLM3 else "chatglm2"])
    actual = _native_weights(tmp_path / "native")
    assert actual.keys() == expected.keys() == index["weight_map"].keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def _with_config(tmp_path: Path, **changes: Any) -> Path:
    folder = original_copy(CHATGLM3, tmp_path / "variant")
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_chatglm_6b_v1_is_refused_with_what_is_supported(tmp_path: Path) -> None:
    # ChatGLM-6B's config: 2D positions, no padded_vocab_size.
    folder = _with_config(tmp_path, position_encoding_2d=True, vocab_size=130528, padded_vocab_size=None)
    config = json.loads((folder / "config.json").read_text())
    del config["padded_vocab_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedCheckpoint, match=r"ChatGLM-6B \(first generation\).*supported: .*ChatGLM3-6B"
    ):
        resolve(str(folder), tmp_path / "cache")


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"rope_ratio": 50}, "rope_ratio=50"),
        ({"quantization_bit": 4}, "quantization_bit=4"),
        ({"original_rope": False}, "original_rope=False"),
    ],
)
def test_chatglm_variants_we_cannot_convert_are_refused(
    tmp_path: Path, changes: dict[str, Any], named: str
) -> None:
    with pytest.raises(UnsupportedCheckpoint, match=named):
        inspect_checkpoint(_with_config(tmp_path, **changes))


def test_unknown_tensors_fail_the_conversion(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = original_copy(CHATGLM3, tmp_path / "extra")
    tensors = _fixture_tensors(CHATGLM3)
    tensors["transformer.prefix_encoder.embedding.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="prefix_encoder"):
        convert(folder, tmp_path / "out", progress=False)


def test_an_original_hub_id_is_refused_and_other_paths_pass_through(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedCheckpoint, match="download it"):
        resolve("THUDM/chatglm3-6b", tmp_path)
    assert resolve("THUDM/glm-4-9b-chat-hf", tmp_path) == "THUDM/glm-4-9b-chat-hf"
    assert not tmp_path.joinpath("converted").exists()


def test_replicas_converting_at_once_convert_once_and_share_the_result(tmp_path: Path) -> None:
    checkpoint = inspect_checkpoint(CHATGLM3)
    assert checkpoint is not None
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(ensure_converted(checkpoint, tmp_path, progress=False))
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    marker = json.loads((results[0] / "chatglm-conversion.json").read_text())
    assert marker["family"] == "chatglm3"
    # Exactly one converted folder (no leftover staging folders), reused by a later call without converting.
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [results[0].name]
    mtime = (results[0] / "model.safetensors").stat().st_mtime_ns
    assert resolve(str(CHATGLM3), tmp_path) == str(results[0])
    assert (results[0] / "model.safetensors").stat().st_mtime_ns == mtime


def test_glm_serve_convert_writes_a_folder_the_auto_classes_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from serve_app.cli import main

    assert (
        main(["convert", str(CHATGLM2), str(tmp_path / "native"), "--tokenizer-model", str(TOKENIZER_MODEL)])
        == 0
    )
    assert "chatglm2 checkpoint converted" in capsys.readouterr().out
    assert AutoConfig.from_pretrained(tmp_path / "native").model_type == "glm"
    assert AutoTokenizer.from_pretrained(tmp_path / "native").encode("你好") == [64790, 64792, 36474, 54591]
    # ChatGLM2's fixture has no tokenizer.model of its own: refused with a message, not a traceback.
    assert main(["convert", str(CHATGLM2), str(tmp_path / "again")]) == 2
    assert "has no tokenizer.model" in capsys.readouterr().err


def test_demo_serves_an_extra_chat_model_after_the_default() -> None:
    from serve_app.builder import parse_config
    from serve_app.profiles import cpu_demo_args, extra_chat_model

    config = parse_config(cpu_demo_args(extra_chat_models=[extra_chat_model(str(CHATGLM3))]))
    assert [m.name for m in config.chat_models] == ["tiny-glm", "chatglm3-tiny"]
    assert config.chat_models[1].path == str(CHATGLM3)
    assert config.chat_models[1].deployment.ray_actor_options.num_gpus == 0
