"""Typed configuration of the whole graph, validated once by the app builder.

Every model section also carries the Serve options of the deployment that serves it (`deployment`): replicas,
autoscaling and resources live next to the model they are for, and nowhere else.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingOptions(_Strict):
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    initial_replicas: Annotated[int | None, Field(ge=0)] = None
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 2.0
    upscale_delay_s: Annotated[float, Field(ge=0)] = 30.0
    downscale_delay_s: Annotated[float, Field(ge=0)] = 600.0
    metrics_interval_s: Annotated[float, Field(gt=0)] = 10.0
    look_back_period_s: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling min_replicas must not exceed max_replicas")
        return self


class ActorOptions(_Strict):
    num_cpus: Annotated[float, Field(ge=0)] = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    accelerator_type: str | None = None
    memory: Annotated[int | None, Field(ge=0)] = None
    resources: dict[str, float] = Field(default_factory=dict)
    env_vars: dict[str, str] = Field(default_factory=dict)


class BackpressureOptions(_Strict):
    """What a request refused for back-pressure is told: 503 with `Retry-After` (Ray's `backpressure_config`)."""

    retry_after_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0


class DeploymentOptions(_Strict):
    """The Serve options of one deployment (a subset of Ray's, with the same names)."""

    num_replicas: Annotated[int | None, Field(ge=1)] = None
    autoscaling_config: AutoscalingOptions | None = None
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 16
    # Requests each caller (a proxy, an ingress replica) holds back while every replica is at
    # max_ongoing_requests; beyond that, 503 at once. None: as many as max_ongoing_requests, so a queued request
    # waits about one round of work and memory stays bounded; -1: no limit (Ray's default).
    max_queued_requests: Annotated[int | None, Field(ge=-1)] = None
    backpressure_config: BackpressureOptions = BackpressureOptions()
    health_check_period_s: Annotated[float, Field(gt=0)] = 10.0
    health_check_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    graceful_shutdown_timeout_s: Annotated[float, Field(ge=0)] = 20.0
    ray_actor_options: ActorOptions = ActorOptions()

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or at least 1")
        return self

    @property
    def queue_limit(self) -> int:
        """max_queued_requests as Serve takes it."""
        if self.max_queued_requests is None:
            return self.max_ongoing_requests
        return self.max_queued_requests

    def to_serve_options(self) -> dict[str, Any]:
        """The keyword arguments of `Deployment.options(...)`."""
        actor = self.ray_actor_options
        actor_options: dict[str, Any] = {"num_cpus": actor.num_cpus, "num_gpus": actor.num_gpus}
        if actor.accelerator_type:
            actor_options["accelerator_type"] = actor.accelerator_type
        if actor.memory is not None:
            actor_options["memory"] = actor.memory
        if actor.resources:
            actor_options["resources"] = dict(actor.resources)
        if actor.env_vars:
            actor_options["runtime_env"] = {"env_vars": dict(actor.env_vars)}
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.queue_limit,
            "backpressure_config": {"retry_after_s": self.backpressure_config.retry_after_s},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "ray_actor_options": actor_options,
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
# Threads torch may use on CPU. Ray gives a replica with a fraction of a CPU a single OpenMP thread, so a model
# replica on a small machine would leave cores idle; None keeps Ray's choice.
CpuThreads = Annotated[int | None, Field(ge=1)]


class QueueDeadlineOptions(_Strict):
    """When a request still waiting for its turn in a model replica (counted from its arrival at the ingress) is
    refused with 503 + Retry-After (the deployment's backpressure_config.retry_after_s) rather than served late:
    after `batches` times the replica's measured time per batch (an embedding batch; a chat engine step: one
    decode step of the running batch with at most one prefill chunk, or one token of the sequential engine), and
    never before `min_wait_s`. Measured, not fixed, so a rated load is served on a slower or busier machine too
    (deployments/queue_deadline.py)."""

    batches: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    min_wait_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 2.0


class ChatModelConfig(_Strict):
    name: Annotated[str, Field(min_length=1, description="The id clients send as `model`.")]
    path: Annotated[str, Field(min_length=1, description="A local folder or a hub id.")]
    trust_remote_code: bool = False
    device: Device = "auto"  # auto: CUDA when the replica was given a GPU, else CPU
    dtype: DType = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    max_model_len: Annotated[int | None, Field(ge=16)] = None  # default: the model's own window
    cpu_threads: CpuThreads = None
    # The replica's event loop and its engine's thread on one CPU (one per replica on a node, by local rank): they
    # take turns holding the GIL, and on two CPUs each turn is a cross-CPU sleep and wake-up
    # (deployments/cpu_affinity.py). For CPU replicas of one torch thread, which the pin would also hold.
    pin_to_one_cpu: bool = False
    # continuous: many conversations share each forward pass (transformers' native full-attention models, e.g.
    # GLM-4); sequential: one at a time through model.generate (sliding-window or mixed attention layers, remote
    # code); auto: continuous when the replica's load-time check finds it can drive the model, else sequential.
    engine: Literal["auto", "continuous", "sequential"] = "auto"
    # Sequences decoded together; the KV cache holds max_num_seqs x max_model_len tokens, allocated at start.
    max_num_seqs: Annotated[int, Field(ge=1)] = 16
    # Prompt tokens prefilled between two decode steps: joining prompts stall the running streams by at most this
    # much work (one forward pass, or several when more prompts arrive during one, as a burst's do); a longer
    # prompt is prefilled in chunks of it, one per step.
    prefill_chunk_tokens: Annotated[int, Field(ge=16)] = 2048
    # Prefill on a thread of its own (the continuous engine; on the CPUs that pin_to_one_cpu leaves, when pinned):
    # decode steps stall for no prompt and a new stream's first token waits for no decode step. For CPU replicas,
    # whose other cores are otherwise idle; on an accelerator both threads would queue on the one device.
    prefill_thread: bool = False
    # Streamed text is sent at most this often per stream (the first increment at once); 0 sends every token.
    stream_interval_ms: Annotated[float, Field(ge=0)] = 50.0
    # Steps: a waiting stream waits for a prefill chunk's turn, or, when every slot is taken, for the running
    # stream nearest its end to finish. 512 covers a full batch of 1,000-token prompts joining at once four times
    # over, or a wait behind 512-token streams (~15 s at 32 streams on 2 CPU cores). Longer, an overload's backlog
    # is served so late that the load after it waits too (bench/overload.py). None: no deadline.
    queue_deadline: QueueDeadlineOptions | None = QueueDeadlineOptions(batches=512)
    owned_by: str = "glm-serve"
    deployment: DeploymentOptions = DeploymentOptions(
        max_ongoing_requests=32, ray_actor_options=ActorOptions(num_gpus=1)
    )

    @model_validator(mode="after")
    def _pin_holds_one_thread(self) -> ChatModelConfig:
        if self.pin_to_one_cpu and (self.device != "cpu" or self.cpu_threads != 1):
            raise ValueError(
                f"chat model {self.name!r}: pin_to_one_cpu needs device: cpu and cpu_threads: 1 (torch's threads "
                "would share the one CPU)"
            )
        return self

    @model_validator(mode="after")
    def _prefill_thread_on_cpu(self) -> ChatModelConfig:
        if self.prefill_thread and self.device != "cpu":
            raise ValueError(
                f"chat model {self.name!r}: prefill_thread needs device: cpu (on an accelerator its passes would "
                "queue behind the decode steps on the one device)"
            )
        return self

    @model_validator(mode="after")
    def _batch_fits(self) -> ChatModelConfig:
        if self.engine != "sequential" and self.deployment.max_ongoing_requests < self.max_num_seqs:
            raise ValueError(
                f"chat model {self.name!r}: deployment.max_ongoing_requests "
                f"({self.deployment.max_ongoing_requests}) must be >= max_num_seqs ({self.max_num_seqs}), "
                "or the batch can never fill"
            )
        return self


class EmbeddingModelConfig(_Strict):
    name: Annotated[str, Field(min_length=1)]
    path: Annotated[str, Field(min_length=1)]
    device: Device = "auto"
    cpu_threads: CpuThreads = None
    # Texts in one batch, from one request or several; a larger request is split, so a batch (and the wait of
    # whoever is behind it) has a bounded cost.
    max_batch_size: Annotated[int, Field(ge=1)] = 64
    # True: a batch's texts run packed into one row of real tokens, padded only for attention
    # (deployments/packed_encoder.py); a model that gives other vectors that way runs padded, with a warning.
    packed: bool = True
    # Texts padded together, by token count (each group pads to its longest): attention's groups when packed,
    # whole forward passes when padded.
    forward_batch_size: Annotated[int, Field(ge=1)] = 32
    # 0: a batch starts at once. Under load batches still fill, from the requests that arrive while the previous
    # batch computes; waiting would only add latency to every request.
    batch_wait_timeout_s: Annotated[float, Field(ge=0)] = 0.0
    # Batches of max_batch_size texts: 32 clients sending 8 texts each fill 4, yet wait behind up to ~7 (batches
    # form from what has reached the replica, often less than a full one; bench/embeddings.py, also with --hog 2).
    # 12 serves that; under overload, waits longer than that are refused (bench/overload.py: with 32, requests
    # waited up to 40 s and the load after the overload was refused). None: no deadline.
    queue_deadline: QueueDeadlineOptions | None = QueueDeadlineOptions(batches=12)
    owned_by: str = "glm-serve"
    deployment: DeploymentOptions = DeploymentOptions(max_ongoing_requests=64)


# A key travels in an `Authorization: Bearer <key>` header and, from the environment, in a comma-separated list:
# printable ASCII without space or comma, and long enough not to be guessed.
_API_KEY = re.compile(r"[!-+\--~]{8,}")
API_KEY_RULE = "at least 8 printable ASCII characters, without spaces or commas"


def is_valid_api_key(key: str) -> bool:
    return _API_KEY.fullmatch(key) is not None


# What a browser sends as `Origin`: scheme://host[:port], no path, no trailing slash (or "*" for any origin).
# CORS compares origins as exact strings, so "https://app.example.com/" would silently never match.
_ORIGIN = re.compile(r"\*|https?://[^/\s]+")


class SecurityConfig(_Strict):
    """Who may call the model routes. /health, the web page and /openapi.json stay open."""

    # Keys that grant access; with none here nor in `api_keys_env`, the model routes are open.
    api_keys: list[SecretStr] = Field(default_factory=list)
    # An environment variable of the ingress replica holding more keys, comma-separated (e.g. from a Kubernetes
    # Secret). Read when the ingress starts, so rotating a key needs a restart of the ingress replicas.
    api_keys_env: Annotated[str | None, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "GLM_SERVE_API_KEYS"
    # Refuse to start without a key, so a missing Secret fails loudly instead of serving an open endpoint.
    require_api_key: bool = False
    # Origins whose pages may call the API from a browser (CORS); none: only the server's own web page.
    cors_origins: list[str] = Field(default_factory=list)

    @field_validator("api_keys")
    @classmethod
    def _keys_fit_a_header(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for index, key in enumerate(keys):
            if not is_valid_api_key(key.get_secret_value()):  # the message never shows the key
                raise ValueError(f"api_keys[{index}] must be {API_KEY_RULE}")
        return keys

    @model_validator(mode="after")
    def _a_required_key_can_exist(self) -> SecurityConfig:
        # With a variable named, its keys are only known where the ingress runs: checked when it starts.
        if self.require_api_key and not self.api_keys and not self.api_keys_env:
            raise ValueError(
                "require_api_key is set but there is no api_keys entry and no api_keys_env to read"
            )
        return self

    @field_validator("cors_origins")
    @classmethod
    def _origins_as_browsers_send_them(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if _ORIGIN.fullmatch(origin) is None:
                raise ValueError(
                    f"{origin!r} is not an origin: write scheme://host[:port] with no path, or '*'"
                )
        return origins


class LimitsConfig(_Strict):
    """Per-request limits, the same on the /v1 routes and the seed routes. Over a limit: a 4xx naming it."""

    max_body_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024  # a larger body: 413, never read whole
    max_messages: Annotated[int, Field(ge=1)] = 1024  # per chat request (a web-demo history pair counts two)
    max_message_chars: Annotated[int, Field(ge=1)] = 262_144  # one message's content, and a /tokenize prompt
    max_embedding_inputs: Annotated[int, Field(ge=1)] = 2048  # strings per embedding request (OpenAI's limit)
    max_embedding_input_chars: Annotated[int, Field(ge=1)] = 65_536  # one embedding input
    # max_tokens a chat request may ask for, and what an omitted max_tokens means; None: the context window.
    # The seed routes (GLM-API sends 4096 by default) are capped to it instead of refused, as they are to the window.
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None


HandleTransport = Literal["grpc", "ray"]


class HandleTransports(_Strict):
    """How the ingress calls each kind of deployment. "grpc": the request and its stream go straight to the
    replica's own gRPC server (Serve's by-value handles), with no task submission or object store on the way.
    "ray": Ray actor calls (Serve's default). Measured on 2 cores (README "The serving path"): chat streams at 16
    clients ~1.05-1.2x the tokens/s over "grpc"; 32 embedding clients ~1.4-1.5x the sentences/s over "ray", whose
    C++ path costs less CPU per short unary call than gRPC's Python server; a lone tokenizer call ~3 ms faster
    over "grpc"."""

    chat: HandleTransport = "grpc"
    embeddings: HandleTransport = "ray"
    tokenizer: HandleTransport = "grpc"


class AppConfig(_Strict):
    chat_models: Annotated[list[ChatModelConfig], Field(min_length=1)]
    embedding_models: list[EmbeddingModelConfig] = Field(default_factory=list)
    tokenizer: DeploymentOptions = DeploymentOptions(max_ongoing_requests=256)
    ingress: DeploymentOptions = DeploymentOptions(max_ongoing_requests=512)
    handle_transport: HandleTransports = HandleTransports()
    # Conversations up to this many characters (every string of the messages and tool definitions) have their
    # prompt rendered by the ingress itself, sparing a call to the tokenizer deployment: ~20 ms of time to first
    # token at 16 streams on 2 cores. Longer ones, whose render would hold the ingress's event loop (and every
    # stream it serves) for longer, go to the tokenizer deployment; 4096 holds it ~2 ms for plain text, ~16 ms at
    # worst, for text made of control-token markers (serving/prompts.py). 0: every one goes there.
    ingress_render_max_chars: Annotated[int, Field(ge=0)] = 4096
    security: SecurityConfig = SecurityConfig()
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        names = [m.name for m in self.chat_models] + [m.name for m in self.embedding_models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        return self
