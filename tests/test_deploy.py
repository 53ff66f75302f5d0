"""deploy/: every manifest validated offline, and checked against what the server really accepts and serves.

- Kubernetes kinds: kubernetes-validate's bundled schemas for one pinned Kubernetes release, strict
  (unknown fields are errors).
- KServe ServingRuntime / InferenceService: the JSON schemas in deploy/schemas/, whose containers, env
  and resources refer to Kubernetes' own definitions from the same release.
- BentoCloud: the keys BentoML's client knows, and the service name of service.py.
- Across files: probe paths are routes BentoML serves, HF_SERVE_* variables and KServe flags are valid
  server arguments, GPU counts agree with the gpus argument.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from settings.arguments import (
    ArgumentError,
    argument_names,
    arguments_from_env,
    engine_argument_names,
    parse_arguments,
)

MISSING_VALIDATOR = "kubernetes-validate (with jsonschema) is not installed; it belongs in pyproject's test extras"

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEPLOY_DIR = PROJECT_DIR / "deploy"
SCHEMA_DIR = DEPLOY_DIR / "schemas"
# The Kubernetes release the manifests are checked against; kubernetes-validate ships its schemas.
KUBERNETES_VERSION = "1.33.0"
K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
KSERVE_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-v1alpha1.json",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "servingruntime-v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-v1beta1.json",
}
# The service in service.py; BentoCloud's per-service settings are keyed by it.
SERVICE_NAME = "huggingface-service"
HEALTH_ROUTES = {"/livez", "/readyz"}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests(folder: str) -> list[tuple[Path, dict[str, Any]]]:
    paths = sorted((DEPLOY_DIR / folder).glob("*.yaml"))
    assert paths, f"no manifests in deploy/{folder}"
    return [(path, doc) for path in paths for doc in _documents(path)]


def _kind(manifests: list[tuple[Path, dict[str, Any]]], kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, doc in manifests if doc.get("kind") == kind]


def _id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.parent.name}/{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


KUBERNETES = _manifests("kubernetes")
KSERVE = _manifests("kserve")
BENTOCLOUD = [(path, _documents(path)[0]) for path in sorted((DEPLOY_DIR / "bentocloud").glob("*.yaml"))]


def _kubernetes_validate() -> Any:
    """kubernetes-validate, or a skip naming it: the checks that need no schema run without it."""
    return pytest.importorskip("kubernetes_validate", reason=MISSING_VALIDATOR)


def _k8s_definitions() -> dict[str, Any]:
    utils = pytest.importorskip("kubernetes_validate.utils", reason=MISSING_VALIDATOR)
    schema_dir = f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict"
    return utils.schema_contents(f"{schema_dir}/_definitions.json", KUBERNETES_VERSION)


def _kserve_validator(schema_file: str) -> Any:
    definitions_json = _k8s_definitions()
    import jsonschema  # installed with kubernetes-validate
    import referencing
    import referencing.jsonschema

    definitions = referencing.Resource.from_contents(definitions_json, referencing.jsonschema.DRAFT202012)
    registry = referencing.Registry().with_resource(K8S_DEFINITIONS_ID, definitions)
    schema = json.loads((SCHEMA_DIR / schema_file).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    return doc["spec"]["containers"]


# --- Kubernetes core kinds ---


def test_kubernetes_kinds_present() -> None:
    kinds = {doc["kind"] for _, doc in KUBERNETES}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds


@pytest.mark.parametrize("item", KUBERNETES, ids=_id)
def test_kubernetes_manifest_is_valid(item: tuple[Path, dict[str, Any]]) -> None:
    kubernetes_validate = _kubernetes_validate()
    _, doc = item
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(part) for part in error.path)
        pytest.fail(f"{_id(item)} is not valid for Kubernetes {KUBERNETES_VERSION}: {where}: {error.message}")


def test_bentoml_serves_the_health_routes() -> None:
    """The probes' paths are BentoML's own system routes, served beside the service's routes."""
    from bentoml._internal.server.base_app import BaseAppFactory

    class _Routes(BaseAppFactory):
        name = "probe-check"

    served = {route.path for route in _Routes().get_system_routes()}
    assert served >= HEALTH_ROUTES


@pytest.mark.parametrize("item", _kind(KUBERNETES, "Deployment"), ids=_id)
def test_deployment_probes_and_ports(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    for container in _containers(doc):
        port_names = {port.get("name") for port in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("livenessProbe", "readinessProbe"):
            port = container[probe]["httpGet"]["port"]
            assert port in port_names or port in {p["containerPort"] for p in container["ports"]}
        # `bentoml serve` listens on 3000 unless told otherwise; the Deployments keep the image's command.
        assert {p["containerPort"] for p in container["ports"]} == {3000}
        assert "command" not in container and "args" not in container


@pytest.mark.parametrize("item", _kind(KUBERNETES, "Deployment"), ids=_id)
def test_deployment_env_are_server_arguments(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    for container in _containers(doc):
        env = _env(container)
        given = arguments_from_env(env)
        assert "model_id" in given, "a Deployment names its model with HF_SERVE_MODEL_ID"
        unknown = set(given) - argument_names() - engine_argument_names()
        assert not unknown, f"HF_SERVE_* variables that are no server argument: {sorted(unknown)}"
        parse_arguments({}, environ=env)


@pytest.mark.parametrize("item", _kind(KUBERNETES, "Deployment"), ids=_id)
def test_deployment_gpu_count_matches_gpus_argument(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    for container in _containers(doc):
        resources = container.get("resources", {})
        requested = resources.get("requests", {}).get("nvidia.com/gpu")
        limited = resources.get("limits", {}).get("nvidia.com/gpu")
        assert requested == limited, "Kubernetes needs GPU requests equal to limits"
        gpus = parse_arguments({}, environ=_env(container)).gpus
        assert int(limited or 0) == gpus, "HF_SERVE_GPUS must equal the nvidia.com/gpu count"


@pytest.mark.parametrize("item", _kind(KUBERNETES, "HorizontalPodAutoscaler"), ids=_id)
def test_hpa_targets_a_deployment_here(item: tuple[Path, dict[str, Any]]) -> None:
    path, doc = item
    target = doc["spec"]["scaleTargetRef"]
    names = {d["metadata"]["name"] for p, d in _kind(KUBERNETES, "Deployment") if p == path}
    assert target["kind"] == "Deployment" and target["name"] in names
    assert doc["spec"]["minReplicas"] <= doc["spec"]["maxReplicas"]


@pytest.mark.parametrize("item", _kind(KUBERNETES, "Service"), ids=_id)
def test_service_selects_a_deployment_here(item: tuple[Path, dict[str, Any]]) -> None:
    path, doc = item
    selector = doc["spec"]["selector"]
    deployments = [d for p, d in _kind(KUBERNETES, "Deployment") if p == path]
    assert any(selector.items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments)
    ports = {p["name"] for d in deployments for c in _containers(d) for p in c["ports"]}
    assert all(p["targetPort"] in ports for p in doc["spec"]["ports"])


# --- KServe ---


def test_kserve_kinds_present() -> None:
    kinds = {doc["kind"] for _, doc in KSERVE}
    assert {"ServingRuntime", "InferenceService"} <= kinds


@pytest.mark.parametrize("item", KSERVE, ids=_id)
def test_kserve_manifest_matches_schema(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    schema_file = KSERVE_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    assert schema_file, f"no schema for {doc.get('apiVersion')} {doc.get('kind')}"
    errors = sorted(_kserve_validator(schema_file).iter_errors(doc), key=lambda e: list(e.path))
    messages = [f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}" for e in errors]
    assert not messages, f"{_id(item)}:\n" + "\n".join(messages)


def test_kserve_schemas_reject_typos() -> None:
    """The schemas are strict enough to catch a misspelt field."""
    runtime = next(doc for _, doc in KSERVE if doc["kind"] == "ServingRuntime")
    broken = json.loads(json.dumps(runtime))
    broken["spec"]["supportedModelFormat"] = broken["spec"].pop("supportedModelFormats")
    assert list(_kserve_validator("servingruntime-v1alpha1.json").iter_errors(broken))
    service = next(doc for _, doc in KSERVE if doc["kind"] == "InferenceService")
    broken = json.loads(json.dumps(service))
    broken["spec"]["predictor"]["model"]["storageURI"] = broken["spec"]["predictor"]["model"].pop("storageUri")
    assert list(_kserve_validator("inferenceservice-v1beta1.json").iter_errors(broken))


@pytest.mark.parametrize("item", _kind(KSERVE, "ServingRuntime"), ids=_id)
def test_serving_runtime_runs_the_kserve_entry(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    spec = doc["spec"]
    assert {"name": "huggingface"}.items() <= spec["supportedModelFormats"][0].items()
    assert set(spec["protocolVersions"]) == {"v1", "v2"}
    container = next(c for c in spec["containers"] if c["name"] == "kserve-container")
    assert container["command"] == ["python", "-m", "huggingfaceserver"]
    assert container["args"] == ["--model_name={{.Name}}", "--model_dir=/mnt/models", "--http_port=8080"]
    assert container["readinessProbe"]["httpGet"]["path"] in HEALTH_ROUTES
    assert container["readinessProbe"]["httpGet"]["port"] == 8080
    # The Bento image keeps its sources in $BENTO_PATH/src, which `python -m` must find.
    assert container["workingDir"] == "/home/bentoml/bento/src"
    if "nvidia.com/gpu" in container["resources"].get("limits", {}):
        assert container["image"].endswith("-gpu:latest"), "GPU runtimes run the GPU image (vLLM)"


@pytest.mark.parametrize("item", _kind(KSERVE, "InferenceService"), ids=_id)
def test_inference_service_uses_a_runtime_here(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    model = doc["spec"]["predictor"]["model"]
    runtimes = {d["metadata"]["name"]: d for _, d in _kind(KSERVE, "ServingRuntime")}
    assert model["runtime"] in runtimes, f"runtime '{model['runtime']}' is not defined in deploy/kserve"
    formats = {f["name"] for f in runtimes[model["runtime"]]["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats


@pytest.mark.parametrize("item", _kind(KSERVE, "InferenceService"), ids=_id)
def test_kserve_flags_are_server_arguments(item: tuple[Path, dict[str, Any]]) -> None:
    """The runtime's flags plus the InferenceService's, as the container gets them, start the server."""
    entry = pytest.importorskip("huggingfaceserver.__main__", reason="the huggingfaceserver entry is not written yet")
    _, doc = item
    model = doc["spec"]["predictor"]["model"]
    runtime = next(d for _, d in _kind(KSERVE, "ServingRuntime") if d["metadata"]["name"] == model["runtime"])
    container = next(c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container")
    argv = [arg.replace("{{.Name}}", doc["metadata"]["name"]) for arg in container["args"] + model.get("args", [])]
    try:
        command = entry.kserve_to_bentoml(argv)
    except ArgumentError as error:
        pytest.fail(f"{_id(item)}: {error}")
    assert command[:2] == ["serve", "service:HuggingFaceService"]
    port_at = command.index("--port")
    assert command[port_at : port_at + 2] == ["--port", "8080"]
    assert f"model_name={doc['metadata']['name']}" in command
    gpus = int(model.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    if gpus:
        assert f"--gpus={gpus}" in argv, "--gpus must equal the nvidia.com/gpu count"


# --- BentoCloud ---


def test_bentocloud_configs_present() -> None:
    assert len(BENTOCLOUD) >= 1


@pytest.mark.parametrize("item", BENTOCLOUD, ids=_id)
def test_bentocloud_config(item: tuple[Path, dict[str, Any]]) -> None:
    import attr
    from bentoml._internal.cloud.schemas.modelschemas import DeploymentServiceConfig, DeploymentTargetHPAConf
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    path, doc = item
    # BentoML's client ignores unknown keys silently: check them against its schema classes.
    top_keys = {f.name for f in attr.fields(CreateDeploymentSchema)} | {"cluster"}
    assert set(doc) <= top_keys, f"{path.name}: unknown keys {sorted(set(doc) - top_keys)}"
    assert doc["bento"].split(":")[0] in {"hf-bentoml-server", "hf-bentoml-server-gpu"}
    assert set(doc["services"]) == {SERVICE_NAME}, f"{path.name}: services are keyed by the name in service.py"
    service_keys = {f.name for f in attr.fields(DeploymentServiceConfig)}
    scaling_keys = {f.name for f in attr.fields(DeploymentTargetHPAConf)}
    for settings in doc["services"].values():
        assert set(settings) <= service_keys, f"{path.name}: unknown keys {sorted(set(settings) - service_keys)}"
        assert set(settings["scaling"]) <= scaling_keys
        assert 0 <= settings["scaling"]["min_replicas"] <= settings["scaling"]["max_replicas"]
        assert re.fullmatch(r"(cpu|gpu)\.[\w.-]+", settings["instance_type"])
    # The client's own structuring: types and nesting as it sends them.
    bentoml_cattr.structure(doc, CreateDeploymentSchema)
    env = {item["name"]: item["value"] for item in doc.get("envs", [])}
    for settings in doc["services"].values():
        env |= {item["name"]: item["value"] for item in settings.get("envs", [])}
    unknown = set(arguments_from_env(env)) - argument_names() - engine_argument_names()
    assert not unknown, f"{path.name}: HF_SERVE_* variables that are no server argument: {sorted(unknown)}"
    args = parse_arguments({}, environ=env)
    assert args.model_id
    if args.gpus:
        assert doc["bento"].startswith("hf-bentoml-server-gpu")
        assert all(s["instance_type"].startswith("gpu.") for s in doc["services"].values())


def test_service_name_matches_service_py() -> None:
    source = PROJECT_DIR / "service.py"
    if not source.is_file():
        pytest.skip("service.py is not written yet")
    assert re.search(r"@bentoml\.service\([^)]*name=\"" + re.escape(SERVICE_NAME) + '"', source.read_text())
