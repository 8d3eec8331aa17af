"""serve_config.yaml is a valid Serve config, and its args are a valid glm-serve config."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.builder import ConfigError, build_app, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def _args(serve_config: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(serve_config["applications"][0]["args"])


def test_serve_config_validates_with_rays_schema(serve_config: dict[str, Any]) -> None:
    schema = ServeDeploySchema.model_validate(serve_config)
    app = schema.applications[0]
    assert app.import_path == "serve_app.builder:build_app"
    # The deployment numbers live in the args only, so nothing in `deployments:` can fight them.
    assert not app.deployments


def test_cluster_profile_pins_chat_replicas_to_a_gpu(serve_config: dict[str, Any]) -> None:
    config = parse_config(_args(serve_config))
    assert all(m.deployment.ray_actor_options.num_gpus == 1 for m in config.chat_models)
    assert [m.name for m in config.embedding_models] == [
        "text2vec-large-chinese",
        "text2vec-base-chinese-paraphrase",
    ]
    deployments = [m.deployment for m in config.chat_models + config.embedding_models]
    assert all(d.autoscaling_config is not None for d in deployments + [config.tokenizer, config.ingress])


def test_builder_binds_one_deployment_per_model(serve_config: dict[str, Any]) -> None:
    from ray.serve._private.build_app import build_app as build_serve_app

    built = build_serve_app(build_app(_args(serve_config)), name="glm-serve")
    names = sorted(d.name for d in built.deployments)
    assert names == sorted(
        [
            "Chat-glm-4-9b-chat",
            "Embedding-text2vec-large-chinese",
            "Embedding-text2vec-base-chinese-paraphrase",
            "Tokenizer",
            "Ingress",
        ]
    )
    chat = next(d for d in built.deployments if d.name == "Chat-glm-4-9b-chat")
    assert chat.ray_actor_options["num_gpus"] == 1


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (lambda a: a["chat_models"][0].update(pathh=a["chat_models"][0].pop("path")), "pathh"),
        (
            lambda a: a["embedding_models"][0]["deployment"].update(max_ongoing_request=3),
            "max_ongoing_request",
        ),
        (lambda a: a.update(chat_model=a.pop("chat_models")), "chat_model"),
        (lambda a: a["chat_models"][0]["deployment"]["ray_actor_options"].update(num_gpu=1), "num_gpu"),
        (lambda a: a["handle_transport"].update(embedding="grpc"), "handle_transport.embedding"),
        (lambda a: a["handle_transport"].update(chat="http"), "handle_transport.chat"),
        (lambda a: a.update(ingress_render_max_chars=-1), "ingress_render_max_chars"),
    ],
    ids=[
        "path",
        "deployment option",
        "top-level key",
        "actor option",
        "transport kind",
        "transport",
        "render size",
    ],
)
def test_a_misspelled_key_fails_naming_it(serve_config: dict[str, Any], mutate: Any, named: str) -> None:
    args = _args(serve_config)
    mutate(args)
    with pytest.raises(ConfigError, match=named):
        build_app(args)


def test_the_cluster_profile_streams_chat_over_grpc_and_embeds_over_ray(serve_config: dict[str, Any]) -> None:
    transports = parse_config(_args(serve_config)).handle_transport
    assert (transports.chat, transports.embeddings, transports.tokenizer) == ("grpc", "ray", "grpc")
    assert (
        parse_config({**_args(serve_config), "handle_transport": {"chat": "ray"}}).handle_transport.chat
        == "ray"
    )


def test_duplicate_model_names_are_rejected(serve_config: dict[str, Any]) -> None:
    args = _args(serve_config)
    args["embedding_models"][1]["name"] = args["embedding_models"][0]["name"]
    with pytest.raises(ConfigError, match="repeated: text2vec-large-chinese"):
        parse_config(args)


def test_the_chat_batch_must_fit_the_replica(serve_config: dict[str, Any]) -> None:
    args = _args(serve_config)
    args["chat_models"][0]["deployment"]["max_ongoing_requests"] = args["chat_models"][0]["max_num_seqs"] - 1
    with pytest.raises(ConfigError, match="max_num_seqs"):
        parse_config(args)


@pytest.mark.parametrize(
    "threads", [{"device": "cpu", "cpu_threads": 2}, {"device": "cpu"}, {"device": "auto", "cpu_threads": 1}]
)
def test_a_chat_replica_is_pinned_to_one_cpu_only_with_one_cpu_thread(
    serve_config: dict[str, Any], threads: dict[str, Any]
) -> None:
    args = _args(serve_config)
    args["chat_models"][0] |= {"pin_to_one_cpu": True, **threads}
    with pytest.raises(ConfigError, match="pin_to_one_cpu needs device: cpu and cpu_threads: 1"):
        parse_config(args)
    args["chat_models"][0] |= {"device": "cpu", "cpu_threads": 1}
    assert parse_config(args).chat_models[0].pin_to_one_cpu


def test_a_prefill_thread_is_for_cpu_replicas_only(serve_config: dict[str, Any]) -> None:
    args = _args(serve_config)
    args["chat_models"][0] |= {"prefill_thread": True, "device": "auto"}
    with pytest.raises(ConfigError, match="prefill_thread needs device: cpu"):
        parse_config(args)
    args["chat_models"][0]["device"] = "cpu"
    assert parse_config(args).chat_models[0].prefill_thread


@pytest.mark.parametrize(
    ("deadline", "field"),
    [
        ({"batches": 0}, "batches"),
        ({"batches": -1}, "batches"),
        ({"batches": "forever"}, "batches"),
        ({"batches": float("inf")}, "batches"),
        ({"batches": 8, "min_wait_s": -1}, "min_wait_s"),
        ({"min_wait_s": 2}, "batches"),
        ({"batches": 8, "max_wait_s": 5}, "max_wait_s"),
    ],
)
def test_a_queue_deadline_is_a_positive_number_of_batches_and_a_floor_in_seconds(
    serve_config: dict[str, Any], deadline: dict[str, Any], field: str
) -> None:
    args = _args(serve_config)
    args["embedding_models"][0]["queue_deadline"] = deadline
    with pytest.raises(ConfigError, match=f"queue_deadline.*{field}"):
        parse_config(args)
