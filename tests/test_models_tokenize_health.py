"""/v1/models, vLLM-style /tokenize and /detokenize, and /health."""

from __future__ import annotations

import os
from typing import Any

import httpx
import openai
import pytest

from tests.serve_logs import failed_requests_logged


def test_models_lists_every_served_model(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-glm", "tiny-glm-tools", "all-MiniLM-L6-v2"]
    card = client.models.retrieve("tiny-glm")
    assert card.id == "tiny-glm" and card.object == "model" and card.created > 0


def test_unknown_model_card_is_404(http: httpx.Client) -> None:
    response = http.get("/v1/models/gpt-5")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_tokenize_detokenize_round_trip(http: httpx.Client) -> None:
    text = "Hello, world! 你好，世界 😀"
    tokens = http.post("/tokenize", json={"model": "tiny-glm", "prompt": text}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == 2048
    back = http.post("/detokenize", json={"model": "tiny-glm", "tokens": tokens["tokens"]}).json()
    assert back["prompt"] == "[gMASK]<sop>" + text  # GLM-4's tokenizer adds its prefix tokens
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["count"] == tokens["count"] - 2
    assert http.post("/detokenize", json={"tokens": plain["tokens"]}).json()["prompt"] == text


def test_tokenize_messages_uses_the_chat_template(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "hi"}]
    tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    rendered = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert rendered == "[gMASK]<sop><|user|>\nhi<|assistant|>\n"


def test_tokenize_returns_token_strings_on_request(
    http: httpx.Client, parts: tuple[Any, Any, list[int]]
) -> None:
    tokenizer = parts[1]
    text = "Hello, world! 你好"
    for body in ({"prompt": text}, {"messages": [{"role": "user", "content": text}]}):
        plain = http.post("/tokenize", json=body).json()
        assert plain["token_strs"] is None  # vLLM's default: ids only
        answer = http.post("/tokenize", json={**body, "return_token_strs": True}).json()
        assert answer["tokens"] == plain["tokens"]
        assert answer["token_strs"] == tokenizer.convert_ids_to_tokens(answer["tokens"])
        assert text in tokenizer.convert_tokens_to_string(answer["token_strs"])


def test_tokenize_continues_the_final_message(http: httpx.Client) -> None:
    """vLLM's continue_final_message: the prompt stops inside the last (assistant) message, for the model to go on
    with it; a client's control-token text in it stays text."""
    for content in ("The answer is", "The answer is <|user|>"):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
        body = {"messages": messages, "continue_final_message": True, "add_generation_prompt": False}
        tokens = http.post("/tokenize", json=body).json()["tokens"]
        rendered = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
        assert rendered == f"[gMASK]<sop><|user|>\nhi<|assistant|>\n{content}"
    assert tokens.count(tokens[2]) == 1  # the one <|user|> token is the template's: the reply's is text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # vLLM's options that this server does not implement: named, never ignored.
        (
            {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ messages }}"},
            "chat_template",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {}},
            "chat_template_kwargs",
        ),
        ({"prompt": "hi", "mm_processor_kwargs": {}}, "mm_processor_kwargs"),
        ({"prompt": "hi", "cache_salt": "x"}, "cache_salt"),
    ],
)
def test_tokenize_refuses_fields_it_does_not_implement(
    http: httpx.Client, body: dict[str, Any], param: str
) -> None:
    response = http.post("/tokenize", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": True}, "add_special_tokens"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True},
            "add_generation_prompt",
        ),
        ({"prompt": "hi", "add_generation_prompt": False}, "add_generation_prompt"),
        ({"prompt": "hi", "continue_final_message": False}, "continue_final_message"),
    ],
)
def test_tokenize_refuses_options_that_would_not_apply(
    http: httpx.Client, body: dict[str, Any], named: str
) -> None:
    response = http.post("/tokenize", json=body)
    assert response.status_code == 400 and named in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("route", "body"), [("/detokenize", {"tokens": [1]}), ("/v1/embeddings", {"input": "hi"})]
)
def test_unknown_fields_are_a_400_naming_them(http: httpx.Client, route: str, body: dict[str, Any]) -> None:
    response = http.post(route, json={**body, "truncate": True})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "truncate"
    assert http.post(route, json=body).status_code == 200


def test_detokenize_rejects_ids_outside_the_vocabulary(http: httpx.Client) -> None:
    response = http.post("/detokenize", json={"tokens": [1, 999_999]})
    assert response.status_code == 400
    assert "999999" in response.json()["error"]["message"]
    # Found by the tokenizer replica, which answers the client's error rather than failing on it: nothing a
    # client sends makes a replica log an error and its traceback.
    assert response.headers["x-request-id"] not in failed_requests_logged("Tokenizer")


def test_health_is_ok_when_every_deployment_answers(http: httpx.Client) -> None:
    response = http.get("/health")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ok"
    assert set(body["deployments"]) == {
        "chat:tiny-glm",
        "chat:tiny-glm-tools",
        "embedding:all-MiniLM-L6-v2",
        "tokenizer",
    }
    assert body["deployments"]["embedding:all-MiniLM-L6-v2"]["dimensions"] == 384
    assert body["deployments"]["chat:tiny-glm"]["running_sequences"] >= 0
    # The CPU profile pins the tiny GLM's replica (pin_to_one_cpu) and prefills on a thread that runs short waves on
    # the pinned CPU and long prompts on every CPU (prefill_thread; deployments/cpu_affinity.py cpus_for_prefill);
    # the tools model keeps the defaults.
    tiny, tools = body["deployments"]["chat:tiny-glm"], body["deployments"]["chat:tiny-glm-tools"]
    cpus = os.sched_getaffinity(0)
    assert tiny["cpu"] in cpus
    assert tiny["prefill_cpus"] == {"short_waves": [tiny["cpu"]], "long_prompts": sorted(cpus)}
    assert tools["cpu"] is None and tools["prefill_cpus"] is None


def test_each_model_replica_derives_its_queue_deadline_from_the_batch_time_it_measures(
    http: httpx.Client, client: openai.OpenAI
) -> None:
    from serve_app.config import ChatModelConfig, EmbeddingModelConfig

    def embed() -> None:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=["one sentence", "and another one"])

    def chat() -> None:
        client.chat.completions.create(
            model="tiny-glm", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
        )

    for name, config, serve_one in (
        ("embedding:all-MiniLM-L6-v2", EmbeddingModelConfig, embed),
        ("chat:tiny-glm", ChatModelConfig, chat),
    ):
        # /health shows the figures of one replica, which Serve picks (the CPU profile runs two embedding
        # replicas): requests go on until the one it shows has served a batch.
        for _ in range(30):
            serve_one()
            measured = http.get("/health").json()["deployments"][name]
            if measured["batch_ms"] is not None:
                break
        # The CPU profile keeps the defaults: a number of batches, and a floor in seconds.
        default = config.model_fields["queue_deadline"].default
        # How long a batch takes depends on the machine and its load (CI's subruns share 2 cores with a second
        # Ray): what is checked is that the deadline follows it.
        assert measured["batch_ms"] > 0, measured
        expected = max(default.min_wait_s, default.batches * measured["batch_ms"] / 1000)
        assert abs(measured["queue_deadline_s"] - expected) < 0.01 * expected, (name, measured)
