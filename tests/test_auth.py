"""API keys and CORS, on a second real ingress (`secured`, tests/secured_app.py) over the session's deployments.

The session app itself has no key, which the other tests rely on: it also shows that with no key configured the
routes stay open and no CORS header is sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from serve_app.builder import ConfigError, parse_config
from serve_app.config import SecurityConfig
from serve_app.security import AccessPolicy, MissingApiKeyError
from tests.secured_app import SecuredApp, deploy_ingress, secured_args

USER = [{"role": "user", "content": "hi"}]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]

# Every model route, with a body it would accept: only the key decides.
OPENAI_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 4}),
    ("POST", "/v1/embeddings", {"input": "hi"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny-glm", None),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}),
]
SEED_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/chat", {"messages": USER, "max_tokens": 4}),
    ("POST", "/embedding", {"prompt": ["hi"]}),
    ("GET", "/models", None),
    ("POST", "/stream", {"query": "hi", "max_tokens": 4}),
    ("GET", "/clear", None),
]
ALL_ROUTES = OPENAI_ROUTES + SEED_ROUTES
WRONG_KEYS = ["wrong-key-0000000000", "config-key", "config-key-7f3a9c1e-and-more", "Config-Key-7F3A9C1E"]


@pytest.fixture(scope="module")
def anonymous(secured: SecuredApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secured.url, timeout=120) as client:
        yield client


def _call(client: httpx.Client, method: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return client.request(method, path, json=body, **kwargs)


def _assert_unauthorized(response: httpx.Response, seed: bool) -> str:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    if seed:  # the seed servers' own error shape
        assert set(response.json()) == {"detail"}
        return str(response.json()["detail"])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    return str(error["message"])


@pytest.mark.parametrize(("method", "path", "body"), ALL_ROUTES, ids=[r[1] for r in ALL_ROUTES])
def test_every_model_route_needs_a_key(anonymous: httpx.Client, method: str, path: str, body: Any) -> None:
    seed = (method, path, body) in SEED_ROUTES
    message = _assert_unauthorized(_call(anonymous, method, path, body), seed)
    assert "Authorization: Bearer" in message
    for header in ("Basic Y29uZmlnLWtleS03ZjNhOWMxZQ==", "Bearer", "config-key-7f3a9c1e"):
        _assert_unauthorized(_call(anonymous, method, path, body, headers={"Authorization": header}), seed)


@pytest.mark.parametrize("wrong", WRONG_KEYS)
def test_a_wrong_key_is_refused(anonymous: httpx.Client, secured: SecuredApp, wrong: str) -> None:
    for method, path, body in (OPENAI_ROUTES[0], SEED_ROUTES[0]):
        response = _call(anonymous, method, path, body, headers=secured.auth(wrong))
        message = _assert_unauthorized(response, seed=path == "/chat")
        assert wrong not in message  # the key sent is never repeated back


@pytest.mark.parametrize(("method", "path", "body"), ALL_ROUTES, ids=[r[1] for r in ALL_ROUTES])
def test_a_right_key_opens_every_model_route(
    anonymous: httpx.Client, secured: SecuredApp, method: str, path: str, body: Any
) -> None:
    response = _call(anonymous, method, path, body, headers=secured.auth())
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("which", ["config", "env"])
def test_openai_client_with_either_key(secured: SecuredApp, which: str) -> None:
    key = secured.config_key if which == "config" else secured.env_key
    client = openai.OpenAI(base_url=f"{secured.url}/v1", api_key=key, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="tiny-glm", messages=MESSAGES, max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="tiny-glm",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason is not None
    vectors = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a", "b"])
    assert len(vectors.data) == 2

    refused = openai.OpenAI(base_url=f"{secured.url}/v1", api_key="not-the-key-1234", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        refused.models.list()
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"


def test_seed_stream_with_the_env_key(anonymous: httpx.Client, secured: SecuredApp) -> None:
    body = {"query": "hi", "max_tokens": 6, "temperature": 0}
    with anonymous.stream("POST", "/stream", json=body, headers=secured.auth(secured.env_key)) as response:
        assert response.status_code == 200
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1]["finished"] is True and events[-1]["history"][0][0] == "hi"


@pytest.mark.parametrize("path", ["/health", "/openapi.json", "/docs", "/", "/static/app.js"])
def test_health_docs_and_the_page_stay_open(anonymous: httpx.Client, path: str) -> None:
    assert anonymous.get(path).status_code == 200


def test_openapi_declares_bearer_auth_on_model_routes_only(
    anonymous: httpx.Client, http: httpx.Client
) -> None:
    schema = anonymous.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/chat/completions"]["post"]["security"] == [{"HTTPBearer": []}]
    assert schema["paths"]["/stream"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]
    # Without keys (the session app) the schema says nothing about auth.
    assert "securitySchemes" not in http.get("/openapi.json").json().get("components", {})


def _preflight(client: httpx.Client, origin: str) -> httpx.Response:
    return client.options(
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_preflight_from_an_allowed_origin_needs_no_key(
    anonymous: httpx.Client, secured: SecuredApp
) -> None:
    response = _preflight(anonymous, secured.allowed_origin)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == secured.allowed_origin
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "POST" in response.headers["access-control-allow-methods"]
    # The answers themselves carry the header too, a 401 included, so the page can read why it was refused.
    refused = anonymous.get("/v1/models", headers={"Origin": secured.allowed_origin})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == secured.allowed_origin
    allowed_call = anonymous.get("/v1/models", headers={"Origin": secured.allowed_origin, **secured.auth()})
    assert allowed_call.status_code == 200
    assert allowed_call.headers["access-control-allow-origin"] == secured.allowed_origin


def test_cors_refuses_other_origins(anonymous: httpx.Client, secured: SecuredApp) -> None:
    response = _preflight(anonymous, "https://evil.example.com")
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    other = anonymous.get("/v1/models", headers={"Origin": "https://evil.example.com", **secured.auth()})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_no_cors_headers_by_default(http: httpx.Client) -> None:
    response = _preflight(http, "https://chat.example.com")
    assert "access-control-allow-origin" not in response.headers
    assert response.status_code == 405  # no CORS layer: OPTIONS is just a method the route does not take
    plain = http.get("/v1/models", headers={"Origin": "https://chat.example.com"})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


def test_keys_are_read_from_config_and_environment() -> None:
    config = SecurityConfig.model_validate({"api_keys": ["config-key-1"], "api_keys_env": "MY_KEYS"})
    policy = AccessPolicy.from_config(config, {"MY_KEYS": "env-key-0001, env-key-0002,"})
    assert all(policy.accepts(k) for k in ("config-key-1", "env-key-0001", "env-key-0002"))
    assert not any(policy.accepts(k) for k in ("", "config-key", "env-key-0001, env-key-0002"))
    assert AccessPolicy.from_config(SecurityConfig(), {}).api_keys == ()  # no key: open
    with pytest.raises(MissingApiKeyError, match=r"key 1 in \$MY_KEYS must be at least 8"):
        AccessPolicy.from_config(config, {"MY_KEYS": "env-key-0001,short"})


def test_a_required_key_that_is_missing_fails_loudly(tiny_glm_path: str) -> None:
    required = SecurityConfig.model_validate({"require_api_key": True, "api_keys_env": "MY_KEYS"})
    with pytest.raises(MissingApiKeyError, match=r"require_api_key.*\$MY_KEYS"):
        AccessPolicy.from_config(required, {"MY_KEYS": " , "})
    # With no variable to read, the config itself is refused when the app is built.
    args: dict[str, Any] = {
        "chat_models": [{"name": "m", "path": tiny_glm_path}],
        "security": {"require_api_key": True, "api_keys_env": None},
    }
    with pytest.raises(ConfigError, match="require_api_key"):
        parse_config(args)
    with pytest.raises(ConfigError, match=r"api_keys\[0\] must be at least 8") as raised:
        parse_config({**args, "security": {"api_keys": ["s3cr3t"]}})
    assert "s3cr3t" not in str(raised.value)


def test_an_ingress_without_its_required_key_does_not_start(secured: SecuredApp) -> None:
    from ray import serve

    from serve_app.profiles import cpu_demo_args

    args = secured_args(cpu_demo_args())
    args["security"] = {"require_api_key": True, "api_keys_env": "GLM_SERVE_TEST_NO_SUCH_KEYS"}
    try:
        with pytest.raises(RuntimeError, match="Deploying application keyless failed"):
            deploy_ingress(args, "glm-serve", "keyless", "/keyless")
        # Serve keeps the replica's reason, for `serve status` and the dashboard to show.
        reason = serve.status().applications["keyless"].deployments["Ingress"].message
        assert "require_api_key is set but no API key was found" in reason
        assert "$GLM_SERVE_TEST_NO_SUCH_KEYS" in reason
    finally:
        serve.delete("keyless")
    # The failed app took nothing down with it.
    client = openai.OpenAI(base_url=f"{secured.url}/v1", api_key=secured.config_key, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-glm", "all-MiniLM-L6-v2"]
