"""The embedded default chat model: a tiny GLM built locally, with no download.

Its weights are random, so its text is gibberish; it exists so that the real loading and serving code
(`from_pretrained(folder)`, the chat template, end tokens, streaming) runs on any machine, tests included.
The folder is built once and reused: a marker file is written last, so a half-built folder is rebuilt.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]

# ChatGLM3's layout: "[gMASK]<sop>" once, then "<|role|>{metadata}\n{content}" per message.
# Newlines are written as {{ '\n' }} because transformers renders templates with trim_blocks.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message.get('metadata') or '' }}{{ '\\n' }}{{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)

# Mixed scripts so that the byte-level BPE learns CJK merges while emoji stay split into byte tokens:
# exactly the case where a streamed delta could end in half a character.
_CORPUS_LINES = [
    "Hello! How can I help you today? The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the tokens before it.",
    "Ray Serve composes deployments through handles; each deployment scales on its own.",
    "Embeddings map sentences to vectors, so similar sentences land close together.",
    "你好！我是一个人工智能助手，很高兴为你服务。今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。语言模型根据前面的词预测下一个词。",
    "北京是中国的首都。上海是一座国际化的大城市。",
    "Emoji are multi-byte characters: 😀 🚀 🎉 ❤️ 👍 🤖 ✨ 🌏.",
    "def add(a, b):\n    return a + b\n",
    "1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828",
]


@dataclass(frozen=True)
class TinyGlmSpec:
    """Size of the tiny model; the benchmark asks for a larger one so that compute dominates."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    vocab_size: int = 2048
    max_position_embeddings: int = 2048
    seed: int = 0

    @property
    def folder_name(self) -> str:
        return (
            f"tiny-glm{_FORMAT}-h{self.hidden_size}-l{self.num_hidden_layers}"
            f"-v{self.vocab_size}-c{self.max_position_embeddings}-s{self.seed}"
        )


_MARKER = "tiny-glm.json"
_FORMAT = "3"  # bumped whenever what _build writes changes, so stale cached folders are not reused


def default_cache_dir() -> Path:
    base = os.environ.get("GLM_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "glm-serve"
    )
    return Path(base)


def ensure_tiny_glm(
    cache_dir: str | os.PathLike[str] | None = None, spec: TinyGlmSpec = TinyGlmSpec()
) -> Path:
    """Return the folder of the tiny GLM described by `spec`, building it first if needed."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()

    def build(staging: Path) -> str:
        _build(staging, spec)
        return json.dumps(asdict(spec))

    return build_once(root / spec.folder_name, _MARKER, build)


def build_once(folder: Path, marker: str, build: Callable[[Path], str]) -> Path:
    """`folder`, built first unless a previous build completed it: `build(staging)` fills a staging folder and
    returns the text of the marker file, written last, so a half-built folder is never taken for a built one."""
    if (folder / marker).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        (staging / marker).write_text(build(staging))
        try:
            staging.rename(folder)
        except OSError:  # another process finished first: keep its folder
            if not (folder / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _corpus() -> list[str]:
    # Python's own docstrings give the BPE a few hundred KB of ordinary English without any download.
    texts = list(_CORPUS_LINES) * 20
    for module_name in ("json", "inspect", "pathlib", "asyncio", "dataclasses", "typing", "argparse"):
        module = __import__(module_name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                texts.append(doc)
    return texts


def _build(folder: Path, spec: TinyGlmSpec) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # GLM-4's tokenizer starts every encoding with "[gMASK]<sop>"; the chat template writes them itself.
    bpe.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="[gMASK] <sop> $A",
                special_tokens=[(t, SPECIAL_TOKENS.index(t)) for t in ("[gMASK]", "<sop>")],
            ),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        # The tokens that say who speaks: text typed by a client is never encoded as one of them (the template
        # builds `<|role|>` from pieces, so they cannot be found in its text; listing them says so).
        chat_control_tokens=SPECIAL_TOKENS,
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    end_tokens = ("<|endoftext|>", "<|user|>", "<|observation|>")
    end_ids: list[int] = [tokenizer.convert_tokens_to_ids(t) for t in end_tokens]  # type: ignore[misc]

    torch.manual_seed(spec.seed)
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=end_ids,
    )
    model = GlmForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
