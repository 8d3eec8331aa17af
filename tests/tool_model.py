"""tiny-glm-tools: the tiny GLM with a GLM-4-style tool template, overfit on CPU to call a tool when asked.

A random-weight model cannot be relied on to emit a call, so the tool tests get one that does: a few seconds of
training on four fixed conversations (a call, two calls at once, the answer after a tool's result, and a greeting
answered in text) until greedy decoding reproduces each reply exactly. Built once into the cache, like the tiny model.
Tests send exactly these prompts (`WEATHER_TOOLS`, the messages below) to get the replies it learned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from serve_app.tiny_glm import TinyGlmSpec, build_once, default_cache_dir, ensure_tiny_glm

MODEL_NAME = "tiny-glm-tools"
_FORMAT = "3"  # bumped whenever the template, the data or the training change
_MARKER = "tiny-glm-tools.json"

# GLM-4's layout: tools in a system turn, a call as "<|assistant|>name\n{arguments}" (several: one a line),
# a tool's result as an observation turn, and a bare "<|assistant|>" to generate after, so that a text reply
# starts with a newline and a call with a name. A message's own `tools` (ChatGLM3's way, which GLM-API forwards)
# follow its text. Newlines are {{ '\n' }}: transformers renders with trim_blocks.
TOOLS_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% if tools %}<|system|>{{ '\\n' }}# Tools"
    "{% for tool in tools %}{% set fn = tool.function if tool.function is defined else tool %}"
    "{{ '\\n\\n' }}## {{ fn.name }}{{ '\\n' }}{{ fn | tojson }}"
    "{% endfor %}{{ '\\n' }}Call a tool by writing its name, then its arguments as JSON on the next line."
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}<|assistant|>"
    "{% for call in message.tool_calls %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ call.function.name }}{{ '\\n' }}"
    "{% if call.function.arguments is string %}{{ call.function.arguments }}"
    "{% else %}{{ call.function.arguments | tojson }}{% endif %}"
    "{% endfor %}"
    "{% elif message.role == 'assistant' %}<|assistant|>{{ '\\n' }}{{ message.content }}"
    "{% elif message.role == 'tool' %}<|observation|>{{ '\\n' }}{{ message.content }}"
    "{% else %}<|{{ message.role }}|>{{ message.metadata or '' }}{{ '\\n' }}{{ message.content }}"
    "{% if message.tools %}{{ '\\n' }}{{ message.tools | tojson }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Typed Any: the SDK and LangChain each want their own TypedDicts of the same JSON.
WEATHER_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time now in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string"}},
                "required": ["timezone"],
            },
        },
    },
]
ASK_WEATHER: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
ASK_TWO_CITIES: list[Any] = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]
GREETING: list[Any] = [{"role": "user", "content": "Hello there"}]
PARIS_CALL = {"city": "Paris"}
TOKYO_CALL = {"city": "Tokyo"}
WEATHER_RESULT = json.dumps({"temperature": 21, "sky": "sunny"})
ANSWER_AFTER_RESULT = "It is sunny in Paris and 21 degrees."
GREETING_REPLY = "Hello! How can I help you today?"


def after_result(call_id: str) -> list[dict[str, Any]]:
    """ASK_WEATHER, the model's call and the tool's result: the model then answers in text."""
    function = {"name": "get_weather", "arguments": json.dumps(PARIS_CALL)}
    call = {"id": call_id, "type": "function", "function": function}
    return [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": WEATHER_RESULT},
    ]


def _examples() -> list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str, str]]:
    """(messages, tools, reply, the end token after it), as the model is to continue each prompt."""
    calls = f"get_weather\n{json.dumps(PARIS_CALL)}"
    two_calls = f"{calls}\nget_weather\n{json.dumps(TOKYO_CALL)}"
    return [
        (ASK_WEATHER, WEATHER_TOOLS, calls, "<|observation|>"),
        (ASK_TWO_CITIES, WEATHER_TOOLS, two_calls, "<|observation|>"),
        (after_result("call_0"), WEATHER_TOOLS, f"\n{ANSWER_AFTER_RESULT}", "<|user|>"),
        (GREETING, WEATHER_TOOLS, f"\n{GREETING_REPLY}", "<|user|>"),
    ]


def _as_served(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """What the server hands the template for this request: trained on exactly that, the model sees no other."""
    from serve_app.protocol.openai import ChatCompletionRequest
    from serve_app.tools.prompts import template_tools

    request = ChatCompletionRequest.model_validate({"messages": messages, "tools": tools})
    return [m.for_template() for m in request.messages], template_tools(request.prompt_tools)


def ensure_tool_model(cache_dir: str | Path | None = None) -> Path:
    """The folder of tiny-glm-tools, trained first if it is not in the cache yet (~10-30 s on 2 cores)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    base = ensure_tiny_glm(root)

    def build(staging: Path) -> str:
        return json.dumps({"steps": _train(base, staging)})

    return build_once(root / f"{MODEL_NAME}{_FORMAT}-{TinyGlmSpec().folder_name}", _MARKER, build)


def _train(base: Path, out: Path, max_steps: int = 600) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TOOLS_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = []
    for messages, tools, reply, end in _examples():
        served_messages, served_tools = _as_served(messages, tools)
        prompt = tokenizer.apply_chat_template(
            served_messages, tools=cast(Any, served_tools), add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        reply_ids = tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(end)]
        rows.append((prompt_ids, reply_ids))
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt_ids, reply_ids) in enumerate(rows):
        ids = prompt_ids + reply_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt_ids) : len(ids)] = torch.tensor(reply_ids)  # learn the replies only
        attention[row, : len(ids)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(1, max_steps + 1):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0 and _learned(model, rows):
            break
    else:
        raise RuntimeError(
            f"tiny-glm-tools did not learn its replies in {max_steps} steps ({loss.item():.4f})"
        )
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return step


def _learned(model: Any, rows: list[tuple[list[int], list[int]]]) -> bool:
    """Does greedy decoding give every reply exactly, end token included?"""
    import torch

    model.eval()
    try:
        with torch.no_grad():
            for prompt_ids, reply_ids in rows:
                ids = torch.tensor([prompt_ids + reply_ids])
                predicted = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].argmax(-1).tolist()
                if predicted != reply_ids:
                    return False
        return True
    finally:
        model.train()


def tool_model_args(cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Its entry in `chat_models` of the test app: CPU, one thread, a tenth of a CPU."""
    return {
        "name": MODEL_NAME,
        "path": str(ensure_tool_model(cache_dir)),
        "device": "cpu",
        "cpu_threads": 1,
        "max_num_seqs": 16,
        "deployment": {
            "num_replicas": 1,
            "max_ongoing_requests": 32,
            "ray_actor_options": {"num_cpus": 0.1, "num_gpus": 0},
        },
    }


if __name__ == "__main__":
    print(ensure_tool_model())
