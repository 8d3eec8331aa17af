"""The KubeRay files in k8s/: valid against KubeRay's CRD, and serving exactly serve_config.yaml.

No Ray cluster and no Kubernetes: the manifests are checked against the RayService CRD's OpenAPI schema with
jsonschema (objects closed, so a misspelled field fails as `kubectl apply` would reject it), and serveConfigV2
with Ray's own ServeDeploySchema and our config models.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from serve_app.builder import parse_config
from serve_app.config import AppConfig, ChatModelConfig, DeploymentOptions, EmbeddingModelConfig

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# The shared folder sits beside the repository (/work/shared for /work/main; the same in CI's fresh clone).
CRD = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kuberay" / "ray.io_rayservices.yaml"

# Kubernetes ObjectMeta, the part a manifest writes. The CRD leaves `metadata` open (`type: object`, the API
# server validates it itself), so a closed stand-in keeps a misspelled `nmae` from passing here.
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


def closed(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema as the API server applies it, in terms jsonschema understands.

    - Objects with `properties` and no `additionalProperties` / `x-kubernetes-preserve-unknown-fields` are closed:
      the API server prunes (or, with strict field validation, rejects) unknown fields; here they fail.
    - `x-kubernetes-int-or-string` accepts an integer or a string (controller-gen also writes that as `anyOf`;
      added where missing).
    - `nullable: true` admits null.
    """
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: closed(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema and "type" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    if not CRD.is_file():
        pytest.skip(f"KubeRay CRD not found at {CRD} (the shared/ folder beside the repository)")
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served")]
    schema = closed(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"].pop("status")  # written by the operator, never by us
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def _documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}#{index}", doc)
        for path in sorted(K8S.glob("*.yaml"))
        for index, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc is not None
    ]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _documents() if doc.get("kind") == kind]


RAYSERVICES = [(name, doc) for name, doc in _documents() if doc.get("kind") == "RayService"]


def _manifest() -> dict[str, Any]:
    (service,) = yaml.safe_load_all((K8S / "rayservice.yaml").read_text())
    return service  # type: ignore[no-any-return]


def _errors(validator: jsonschema.protocols.Validator, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=str)
    ]


def test_there_is_a_rayservice() -> None:
    assert [name for name, _ in RAYSERVICES] == ["rayservice.yaml#0"]


@pytest.mark.parametrize("name, doc", RAYSERVICES, ids=[name for name, _ in RAYSERVICES])
def test_rayservice_matches_the_crd(validator: jsonschema.protocols.Validator, name: str, doc: dict) -> None:
    assert _errors(validator, doc) == []


@pytest.mark.parametrize(
    "misspell",
    [
        pytest.param(
            lambda s: s["spec"].__setitem__("rayClusterConfg", s["spec"].pop("rayClusterConfig")), id="spec"
        ),
        pytest.param(
            lambda s: s["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][
                0
            ].__setitem__("resource", {}),
            id="container",
        ),
        pytest.param(lambda s: s["metadata"].__setitem__("nmae", "x"), id="metadata"),
    ],
)
def test_a_misspelled_field_fails(validator: jsonschema.protocols.Validator, misspell: Any) -> None:
    service = _manifest()
    misspell(service)
    errors = _errors(validator, service)
    assert errors and "Additional properties are not allowed" in " ".join(errors)


@pytest.mark.parametrize("quantity, valid", [(1, True), ("1", True), ("500m", True), ("one", False)])
def test_int_or_string_quantities(
    validator: jsonschema.protocols.Validator, quantity: Any, valid: bool
) -> None:
    service = _manifest()
    gpu_group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = quantity
    assert (_errors(validator, service) == []) is valid


# --- serveConfigV2 against serve_config.yaml -----------------------------------------------------------------


def _serve_config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "serve_config.yaml").read_text())  # type: ignore[no-any-return]


def _serve_config_v2() -> dict[str, Any]:
    return yaml.safe_load(_manifest()["spec"]["serveConfigV2"])  # type: ignore[no-any-return]


def test_serve_config_v2_is_a_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(_serve_config_v2())
    assert [app.name for app in schema.applications] == ["glm-serve"]


def test_serve_config_v2_is_serve_config_yaml_with_model_paths_mapped() -> None:
    """One source of truth: only model `path`s differ (hub id -> /models/<hub id>, render.PATH_MAPPING)."""
    assert _serve_config_v2() == render.map_paths(_serve_config()), "run python k8s/render.py"


def test_rendered_files_are_up_to_date() -> None:
    assert render.main(["--check"]) == 0, "run python k8s/render.py"


def test_path_mapping() -> None:
    assert render.pod_path("THUDM/glm-4-9b-chat-hf") == "/models/THUDM/glm-4-9b-chat-hf"
    assert render.pod_path("/data/glm") == "/data/glm"
    drifted = _serve_config()
    drifted["applications"][0]["args"]["chat_models"][0]["max_num_seqs"] = 8
    assert render.map_paths(drifted) != _serve_config_v2()


def _app_config() -> AppConfig:
    (app,) = _serve_config_v2()["applications"]
    return parse_config(app["args"])


def _models() -> list[ChatModelConfig | EmbeddingModelConfig]:
    config = _app_config()
    return [*config.chat_models, *config.embedding_models]


def test_models_are_read_from_the_models_volume() -> None:
    for model in _models():
        assert model.path.startswith(render.MODELS_ROOT + "/"), model.name
    for group in _worker_groups():
        pod = group["template"]["spec"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == render.MODELS_ROOT]
        assert mount.get("readOnly") is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == _pvc()["metadata"]["name"]


def test_chat_replicas_are_pinned_to_a_gpu() -> None:
    for model in _app_config().chat_models:
        assert model.deployment.ray_actor_options.num_gpus >= 1, model.name
        assert model.device in ("auto", "cuda"), model.name


# --- the cluster holds what Serve asks for --------------------------------------------------------------------


def _worker_groups() -> list[dict[str, Any]]:
    return _manifest()["spec"]["rayClusterConfig"]["workerGroupSpecs"]  # type: ignore[no-any-return]


def _group(name: str) -> dict[str, Any]:
    (group,) = [g for g in _worker_groups() if g["groupName"] == name]
    return group


def _cpus(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _ray_cpus(group: dict[str, Any]) -> float:
    """The CPUs Ray schedules on a pod: rayStartParams' num-cpus, else what KubeRay reads from the CPU limit."""
    if "num-cpus" in group.get("rayStartParams", {}):
        return float(group["rayStartParams"]["num-cpus"])
    return _cpus(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])


def _max_replicas(options: DeploymentOptions) -> int:
    if options.autoscaling_config is not None:
        return options.autoscaling_config.max_replicas
    return options.num_replicas or 1


def test_head_runs_no_replicas_and_autoscaling_is_on() -> None:
    cluster = _manifest()["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]
    for group in _worker_groups():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_gpu_group_holds_every_chat_replica() -> None:
    group = _group("gpu")
    pod = group["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    gpus = int(resources["limits"]["nvidia.com/gpu"])
    assert gpus == int(resources["requests"]["nvidia.com/gpu"]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    chat = [m.deployment for m in _app_config().chat_models]
    for options in chat:
        actor = options.ray_actor_options
        assert actor.num_gpus <= gpus and actor.num_cpus <= _ray_cpus(group)
    needed = sum(_max_replicas(o) * o.ray_actor_options.num_gpus for o in chat)
    assert group["maxReplicas"] * gpus >= needed


def test_no_cpu_only_replica_fits_on_a_gpu_pod() -> None:
    # Else one lands on a GPU pod whose chat replica scaled down, and the next chat replica cannot fit there.
    config = _app_config()
    cpu_only = [m.deployment for m in config.embedding_models] + [config.tokenizer, config.ingress]
    assert _ray_cpus(_group("gpu")) == 0
    assert all(o.ray_actor_options.num_cpus > 0 for o in cpu_only)


def test_cpu_group_holds_every_other_replica() -> None:
    config = _app_config()
    cpu_only = [m.deployment for m in config.embedding_models] + [config.tokenizer, config.ingress]
    assert all(o.ray_actor_options.num_gpus == 0 for o in cpu_only)
    group = _group("cpu")
    assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    needed = sum(_max_replicas(o) * o.ray_actor_options.num_cpus for o in cpu_only)
    assert group["maxReplicas"] * _ray_cpus(group) >= needed


def test_serve_listens_where_kuberay_looks() -> None:
    http = _serve_config_v2()["http_options"]
    head = _manifest()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (serve_port,) = [p["containerPort"] for p in head["ports"] if p["name"] == "serve"]
    assert http["host"] == "0.0.0.0" and http["port"] == serve_port


def _containers() -> list[dict[str, Any]]:
    cluster = _manifest()["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_pods_run_offline_on_one_image_of_the_manifests_ray() -> None:
    containers = _containers()
    images = {c["image"] for c in containers} | {
        c["image"] for job in _of_kind("Job") for c in job["spec"]["template"]["spec"]["containers"]
    }
    assert len(images) == 1
    for container in containers:
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"], container["name"]
    base = re.search(r"^FROM rayproject/ray:(\S+)", (K8S / "Dockerfile").read_text(), re.MULTILINE)
    assert base is not None
    ray_version = _manifest()["spec"]["rayClusterConfig"]["rayVersion"]
    assert base.group(1).startswith(f"{ray_version}-")


def _pvc() -> dict[str, Any]:
    (pvc,) = _of_kind("PersistentVolumeClaim")
    return pvc


def test_models_pvc() -> None:
    pvc = _pvc()
    assert pvc["apiVersion"] == "v1"
    # Pods on several nodes mount it at once.
    assert set(pvc["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}
    storage = pvc["spec"]["resources"]["requests"]["storage"]
    assert re.fullmatch(r"[0-9]+(Gi|Ti)", storage), storage


def test_download_job_fills_every_model_folder() -> None:
    (job,) = _of_kind("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = container["command"][-1]
    for model in _models():
        assert f"--local-dir {model.path}" in script, model.name
    (volume,) = job["spec"]["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == _pvc()["metadata"]["name"]
