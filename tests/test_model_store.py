"""Baking a model into a Bento: store a folder in BentoML's model store, build with its tag, serve the Bento."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time

import httpx
import yaml

from tests import reference
from tests.server_process import BENTOML, PROJECT_DIR, free_port


def test_baked_model_is_packed_into_the_bento_and_served(tiny_models, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_SERVE_")}
    env |= {"BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}
    model = tiny_models["sequence_classification"]

    def run(*command: str) -> str:
        done = subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    stored = run(sys.executable, "-m", "settings.model_store", "--model_dir", str(model), "--name", "tiny-sst")
    assert stored.strip().startswith("tiny-sst:")
    built = run(BENTOML, "build", "--output", "tag", "--arg", "bento_model=tiny-sst:latest", "--arg", "model_name=sst")
    tag = next(line for line in built.splitlines() if line.startswith("__tag__:")).removeprefix("__tag__:")
    name, version = tag.split(":")
    bento_yaml = yaml.safe_load((tmp_path / "bentoml" / "bentos" / name / version / "bento.yaml").read_text())
    assert [m["tag"] for m in bento_yaml["services"][0]["models"]] == [stored.strip()]
    # What `bentoml containerize` and `bentoml push` ship: the exported Bento carries the model files.
    archive = tmp_path / "exported.bento"
    run(BENTOML, "export", tag, str(archive))
    with tarfile.open(archive) as bundle:
        assert any(n.startswith("./models/tiny-sst/") and n.endswith("model.safetensors") for n in bundle.getnames())

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [BENTOML, "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        texts = ["hello world", "the capital of france"]
        response = httpx.post(f"{url}/v1/models/sst:predict", json={"instances": texts}, timeout=30)
        expected = reference.classification_logits(model, texts).argmax(dim=-1).tolist()
        assert response.json() == {"predictions": expected}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
