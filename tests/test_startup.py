"""Starting the server: arguments from --arg, --arg-file, the environment and KServe's command line;
start-up failures that name their cause; readiness before the model is loaded."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from engines.encoder_runtime import PredictiveRuntime
from handlers.errors import NotReady
from handlers.requests import PredictOptions
from huggingfaceserver.__main__ import kserve_to_bentoml
from settings.arguments import parse_arguments
from tests.server_process import BENTOML, PROJECT_DIR, ServerProcess, free_port


def run_to_exit(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)


def test_unknown_argument_stops_the_start_naming_it():
    done = run_to_exit([BENTOML, "serve", "service:HuggingFaceService", "--arg", "model_nme=x"])
    assert done.returncode != 0
    assert "'model_nme' (did you mean 'model_name'?)" in done.stdout + done.stderr


def test_missing_model_folder_stops_the_start_with_its_reason():
    done = run_to_exit([BENTOML, "serve", "service:HuggingFaceService", "--arg", "model_dir=/nonexistent/model"])
    assert done.returncode == 2
    assert "model_dir '/nonexistent/model' is not a folder" in done.stderr


def test_kserve_command_line_rejects_unknown_flags():
    done = run_to_exit([sys.executable, "-m", "huggingfaceserver", "--model_name=x", "--retrun_probabilities"])
    assert done.returncode != 0 and "did you mean 'return_probabilities'" in done.stderr


def test_kserve_flags_translate_to_bentoml_serve():
    command = kserve_to_bentoml(["--model_name=m", "--http_port", "8080", "--return_probabilities", "--max_length=64"])
    assert command == [
        "serve", "service:HuggingFaceService", "--port", "8080",
        "--arg", "model_name=m", "--arg", "return_probabilities=true", "--arg", "max_length=64",
        "--arg", "grpc_port=8081",  # KServe serves gRPC on 8081 unless --enable_grpc=false
    ]  # fmt: skip


def test_kserve_command_line_arg_file_and_environment_serve(tiny_models, tmp_path):
    model = str(tiny_models["sequence_classification"])
    arg_file = tmp_path / "sst.yaml"
    arg_file.write_text(yaml.safe_dump({"model_dir": model, "model_name": "from-file"}))
    kserve_command = [sys.executable, "-m", "huggingfaceserver", "--model_name=from-kserve", f"--model_dir={model}"]
    kserve_command.append(f"--grpc_port={free_port()}")  # not KServe's 8081, which other servers here may hold
    servers = {
        "from-kserve": ServerProcess({}, tmp_path / "kserve.log", command=kserve_command),
        "from-file": ServerProcess({}, tmp_path / "file.log", serve_options=["--arg-file", str(arg_file)]),
        "from-env": ServerProcess(
            {}, tmp_path / "env.log", env={"HF_SERVE_MODEL_NAME": "from-env", "HF_SERVE_MODEL_DIR": model}
        ),
    }
    try:
        for name, server in servers.items():
            server.wait_ready()
            assert httpx.get(f"{server.url}/v1/models").json() == {"models": [name]}
            response = httpx.post(f"{server.url}/v1/models/{name}:predict", json={"instances": ["hello"]})
            assert response.status_code == 200 and isinstance(response.json()["predictions"][0], int)
    finally:
        for server in servers.values():
            server.stop()


def test_predict_before_the_model_is_loaded_is_503(tiny_models):
    args = parse_arguments({"model_dir": str(tiny_models["sequence_classification"])}, environ={})
    runtime = PredictiveRuntime(args)
    assert not runtime.ready
    with pytest.raises(NotReady) as raised:
        asyncio.run(runtime.predict(["hello"], PredictOptions()))
    assert raised.value.status_code == 503 and "still loading" in raised.value.message
    gc.unfreeze()
    runtime.load()
    assert runtime.ready
    # Start-up objects are out of the collector's scans once ready (engines/memory.py: no 300 ms pauses).
    assert gc.get_freeze_count() > 10_000
    result = asyncio.run(runtime.predict(["hello"], PredictOptions()))
    assert isinstance(result.predictions[0], int)


def test_every_argument_is_documented_in_the_readme():
    from settings.arguments import argument_names

    readme = (Path(PROJECT_DIR) / "README.md").read_text()
    missing = [name for name in sorted(argument_names()) if f"`{name}`" not in readme]
    assert not missing, f"arguments missing from README.md: {missing}"


def test_model_id_is_read_from_the_hub_cache_offline(tiny_models, tmp_path):
    """model_id + revision resolve through huggingface_hub's cache layout with HF_HUB_OFFLINE=1."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-sst"
    shutil.copytree(tiny_models["sequence_classification"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "from settings.arguments import parse_arguments; from settings.loading import inspect_model;"
        "s = inspect_model(parse_arguments({'model_id': 'tiny-org/tiny-sst'}, environ={}));"
        "print(s.task.value, s.path.name)"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_DIR, env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["sequence_classification", commit], done.stderr
    missing = subprocess.run(
        [sys.executable, "-c", script.replace("tiny-sst", "absent")], cwd=PROJECT_DIR, env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert missing.returncode != 0
    assert "model_id 'tiny-org/absent' could not be found (HF_HUB_OFFLINE is set" in missing.stderr
