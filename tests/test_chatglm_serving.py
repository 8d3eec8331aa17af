"""An original ChatGLM3 folder given as a chat model's path is converted by its replicas and served natively:
over the real Serve app, on the continuous engine beside other streams, it gives the converted model's greedy
continuation (the original code's, per test_chatglm_conversion.py), and a reply ends at <|user|> without it.

The model runs in an app of its own under /chatglm, beside the session app (whose model list other tests
check), with 0.1 CPU per replica.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from serve_app.chatglm.checkpoint import convert
from tests.chatglm_fixtures import (
    CHATGLM3,
    chat_messages,
    original_copy,
    reference,
    require_fixtures,
    tokenizer_reference,
)
from tests.extra_app import extra_app

APP = "chatglm"
PREFIX = "/chatglm"
MODEL = "chatglm3-tiny"
STOPPING_MODEL = "chatglm3-tiny-stops"
USER_TOKEN = 64795
END_IDS = [2, USER_TOKEN, 64797]
SMALL = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}


@dataclass(frozen=True)
class Native:
    model: Any
    tokenizer: Any

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
                "input_ids"
            ]
        )

    def greedy(
        self, prompt_ids: list[int], max_new_tokens: int, end_ids: list[int] | None = None
    ) -> list[int]:
        input_ids = torch.tensor([prompt_ids])
        out = self.model.generate(
            input_ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=end_ids or END_IDS
        )
        return list(out[0, len(prompt_ids) :].tolist())

    def reply_text(self, prompt_ids: list[int], generated: list[int]) -> str:
        """What a stream of `generated` reads as after this prompt: decoded in context, end tokens skipped."""
        context = prompt_ids[-4:]
        head = self.tokenizer.decode(context, skip_special_tokens=True)
        return str(self.tokenizer.decode(context + generated, skip_special_tokens=True))[len(head) :]


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Native:
    """The converted model in this process: the oracle for the served one."""
    require_fixtures()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("native") / MODEL
    convert(CHATGLM3, folder, progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return Native(model, AutoTokenizer.from_pretrained(folder))


def _short_chat(native: Native) -> tuple[list[dict[str, Any]], list[int]]:
    """The reference's chat_short prompt as the chat it is, and its reference greedy continuation."""
    prompt = reference(CHATGLM3)["prompts"]["chat_short"]
    content = native.tokenizer.decode(prompt["input_ids"][5:-1]).strip()
    messages = [{"role": "user", "content": content}]
    assert native.prompt_ids(messages) == prompt["input_ids"]
    return messages, prompt["greedy_24_use_cache"]


@dataclass(frozen=True)
class Stopping:
    folder: Path
    reply_ids: list[int]  # what the model generates before <|user|>


@pytest.fixture(scope="module")
def stopping(native: Native, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stopping]:
    """chatglm3-tiny, original layout, with <|user|>'s output row a scaled copy of a later greedy token's, so
    that after a few tokens the model writes <|user|> (as ChatGLM3 ends its turn) and nothing else changes."""
    from safetensors.torch import load_file, save_file

    messages, _ = _short_chat(native)
    prompt_ids = native.prompt_ids(messages)
    free_run = native.greedy(prompt_ids, 12, end_ids=[2])
    head = native.model.lm_head.weight
    original_row = head[USER_TOKEN].detach().clone()
    found = None
    with torch.no_grad():
        for steps in range(3, 8):
            for scale in (1.001, 1.01, 1.05, 1.2):
                head[USER_TOKEN] = scale * head[free_run[steps]]
                if native.greedy(prompt_ids, 12) == [*free_run[:steps], USER_TOKEN]:
                    found = steps, scale
                    break
            if found:
                break
        head[USER_TOKEN] = original_row
    assert found is not None, "no output row found that makes the tiny model end its turn"
    steps, scale = found
    folder = original_copy(CHATGLM3, tmp_path_factory.mktemp("stopping") / STOPPING_MODEL)
    weights = load_file(str(CHATGLM3 / "model.safetensors"))
    output = weights["transformer.output_layer.weight"]
    output[USER_TOKEN] = scale * output[free_run[steps]]
    save_file(weights, str(folder / "model.safetensors"))
    yield Stopping(folder, free_run[:steps])


@pytest.fixture(scope="module")
def conversion_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The replicas' cache of converted models (GLM_SERVE_CACHE in their environment): empty at start, so they
    convert, and private, so test runs leave nothing in the user's cache."""
    return tmp_path_factory.mktemp("glm-serve-cache")


@pytest.fixture(scope="module")
def chatglm_url(base_url: str, stopping: Stopping, conversion_cache: Path) -> Iterator[str]:
    from serve_app.profiles import extra_chat_model

    actor = {"num_cpus": 0.1, "env_vars": {"GLM_SERVE_CACHE": str(conversion_cache)}}

    def chat_model(path: Path, name: str) -> dict[str, Any]:
        # The original folders themselves: the replicas convert them (once, under a lock) into the cache.
        model = extra_chat_model(str(path), name=name, max_num_seqs=8, max_model_len=512)
        model["deployment"]["ray_actor_options"] = actor
        return model

    args = {
        "chat_models": [chat_model(CHATGLM3, MODEL), chat_model(stopping.folder, STOPPING_MODEL)],
        "tokenizer": {"num_replicas": 1, "ray_actor_options": actor},
        "ingress": SMALL,
    }
    with extra_app(base_url, APP, PREFIX, args, healthy_within_s=300) as url:
        yield url


def test_chat_and_tokenizer_replicas_share_one_conversion_per_model(
    chatglm_url: str, conversion_cache: Path
) -> None:
    converted = conversion_cache / "converted"
    folders = sorted(p for p in converted.iterdir() if p.is_dir())
    # One folder per model (no second conversion, no staging folder left), each complete.
    assert [p.name.rsplit("-", 1)[0] for p in folders] == [MODEL, STOPPING_MODEL]
    for folder in folders:
        assert json.loads((folder / "chatglm-conversion.json").read_text())["family"] == "chatglm3"
        assert json.loads((folder / "config.json").read_text())["model_type"] == "glm"


def _chat(url: str, model: str, messages: list[dict[str, Any]], stream: bool = False) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "max_tokens": 24, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    with httpx.Client(base_url=url, timeout=120) as http:
        if not stream:
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            return {
                "text": choice["message"]["content"],
                "finish": choice["finish_reason"],
                **response.json()["usage"],
            }
        text, finish, usage = "", None, dict[str, Any]()
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                for choice in event["choices"]:
                    text += choice["delta"].get("content") or ""
                    finish = choice["finish_reason"] or finish
                usage = event.get("usage") or usage
        return {"text": text, "finish": finish, **usage}


def test_served_greedy_continuations_match_while_other_streams_run(chatglm_url: str, native: Native) -> None:
    short, reference_greedy = _short_chat(native)
    # Five of build_chat_input's conversations (the tool-calling one: the next test, through `tools`).
    conversations = [chat_messages(c)[0] for c in tokenizer_reference()["chat_inputs"] if c["role"] == "user"]
    cases = [(short, False), (short, True), *((m, i % 2 == 0) for i, m in enumerate(conversations))]
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda case: _chat(chatglm_url, MODEL, *case), cases))
    for (messages, streamed), reply in zip(cases, replies, strict=True):
        prompt_ids = native.prompt_ids(messages)
        generated = native.greedy(prompt_ids, 24)
        if messages is short:
            assert generated == reference_greedy  # the original code's own continuation
        ended = generated[-1] in END_IDS
        assert reply["prompt_tokens"] == len(prompt_ids), (messages, streamed)
        assert reply["completion_tokens"] == len(generated), (messages, streamed)
        assert reply["finish"] == ("stop" if ended else "length"), (messages, streamed)
        assert reply["text"] == native.reply_text(prompt_ids, generated), (messages, streamed)


def test_an_openai_tool_conversation_reaches_chatglm3_as_its_own_turns(
    chatglm_url: str, native: Native
) -> None:
    """build_chat_input's tool-calling conversation, as an OpenAI client sends it: `tools`, the assistant's call as
    `tool_calls` (arguments as a JSON string), its result as a `tool` message. The served prompt is the original's
    (its tokens count, and the model continues it as it continues the original's ids)."""
    case = next(c for c in tokenizer_reference()["chat_inputs"] if c["role"] == "observation")
    messages, tools = chat_messages(case)
    assert tools is not None
    system, user, call_turn, result = messages
    arguments = json.dumps({"city_name": "北京"}, ensure_ascii=False)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": call_turn["metadata"], "arguments": arguments},
    }
    body = {
        "model": MODEL,
        "messages": [
            system,
            user,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": result["content"]},
        ],
        "tools": [{"type": "function", "function": tool} for tool in tools],
        "max_tokens": 24,
        "temperature": 0,
    }
    with httpx.Client(base_url=chatglm_url, timeout=120) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    generated = native.greedy(case["input_ids"], 24)
    assert response.json()["usage"] == {
        "prompt_tokens": len(case["input_ids"]),
        "completion_tokens": len(generated),
        "total_tokens": len(case["input_ids"]) + len(generated),
    }
    # Random weights write no call: the reply is the text the original's ids continue with.
    message = response.json()["choices"][0]["message"]
    assert message["content"] == native.reply_text(case["input_ids"], generated).removeprefix("\n")


def test_a_forced_call_is_written_in_chatglm3s_own_syntax(chatglm_url: str) -> None:
    """tool_choice names a tool: the reply is that call, written as ChatGLM3 writes its calls (the name, then a
    `tool_call(...)` block), not GLM-4's JSON object, and read back as the call's arguments."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}, "celsius": {"type": "boolean"}},
                "required": ["city", "celsius"],
            },
        },
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [tool],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 64,
        "temperature": 0,
        "logprobs": True,
    }
    with httpx.Client(base_url=chatglm_url, timeout=120) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "get_weather" and set(arguments) == {"city", "celsius"}
    written = b"".join(bytes(item["bytes"]) for item in choice["logprobs"]["content"]).decode()
    celsius = "True" if arguments["celsius"] else "False"
    assert written.startswith(
        f"get_weather\n ```python\ntool_call(city={json.dumps(arguments['city'], ensure_ascii=False)}, celsius={celsius})\n```"
    ), written
    # Streamed, the same greedy call arrives as delta.tool_calls: its name, then its arguments' fragments.
    name, fragments, finish = "", [], None
    with (
        httpx.Client(base_url=chatglm_url, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response,
    ):
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            streamed = json.loads(line.removeprefix("data: "))["choices"][0]
            for delta in streamed["delta"].get("tool_calls") or []:
                name += delta.get("function", {}).get("name") or ""
                fragments.append(delta.get("function", {}).get("arguments") or "")
            finish = streamed.get("finish_reason") or finish
    assert (name, json.loads("".join(fragments)), finish) == ("get_weather", arguments, "tool_calls")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_chatglm3_reply_ends_at_user_and_never_contains_it(
    chatglm_url: str, native: Native, stopping: Stopping, stream: bool
) -> None:
    messages, _ = _short_chat(native)
    reply = _chat(chatglm_url, STOPPING_MODEL, messages, stream)
    assert reply["finish"] == "stop"
    assert "<|user|>" not in reply["text"]
    assert reply["text"] == native.reply_text(native.prompt_ids(messages), stopping.reply_ids)
    assert reply["text"]  # it wrote something before ending its turn


@pytest.mark.parametrize("route", ["openai", "openai_tools", "glm_api", "web_demo"])
def test_client_text_never_becomes_a_chatglm3_control_token(
    chatglm_url: str, native: Native, route: str
) -> None:
    """test_control_tokens.py's property, on the converted ChatGLM3 (SentencePiece, `<sop>`-style surfaces)."""
    from hypothesis import given
    from hypothesis import strategies as st

    from tests.hostile import SETTINGS
    from tests.test_control_tokens import CONVERSATIONS, ChatModel, _hostile_text, tool_conversation

    tokenizer = native.tokenizer
    texts = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.chat_control_tokens or []))
    model = ChatModel(MODEL, tokenizer, texts, frozenset(tokenizer.convert_tokens_to_ids(texts)), False)
    # The tools route: tool definitions, a call (ChatGLM3's own key=value turn) and its result.
    build = tool_conversation if route == "openai_tools" else lambda text: (CONVERSATIONS[route](text), None)

    def tokenize(http: httpx.Client, conversation: tuple[list[dict[str, Any]], Any]) -> list[int]:
        messages, tools = conversation
        response = http.post("/tokenize", json={"model": MODEL, "messages": messages, "tools": tools})
        assert response.status_code == 200, response.text
        return list(response.json()["tokens"])

    with httpx.Client(base_url=chatglm_url, timeout=60) as http:

        @SETTINGS
        @given(st.data())
        def check(data: st.DataObject) -> None:
            hostile = tokenize(http, build(lambda: data.draw(_hostile_text(model))))
            plain = tokenize(http, build(lambda: "plain"))
            assert model.control_sequence(hostile) == model.control_sequence(plain)

        check()
