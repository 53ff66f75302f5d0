"""Worker processes and torch threads (settings/parallelism.py), and readiness across workers
(engines/worker_readiness.py): a small encoder on CPU gets one single-threaded worker per core, and the server
says ready only once every worker has its model loaded."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest

from engines.worker_readiness import WorkerReadiness
from settings.arguments import parse_arguments
from settings.loading import inspect_model
from settings.parallelism import SMALL_ENCODER_BYTES, settle_parallelism, usable_cores
from tests.server_process import ServerProcess


def settled(model: Path, cores: int, **given: str) -> tuple[int | None, int | None]:
    args = parse_arguments({"model_dir": str(model), **given})
    result = settle_parallelism(args, inspect_model(args), cores=cores)
    return result.workers, result.torch_threads


def test_a_small_encoder_on_cpu_gets_one_single_threaded_worker_per_core(tiny_models):
    assert settled(tiny_models["sequence_classification"], cores=2) == (2, 1)
    assert settled(tiny_models["sentence_transformers"], cores=4) == (4, 1)
    assert settled(tiny_models["sentence_transformers"], cores=64) == (8, 8)  # at most 8 copies of the model
    assert settled(tiny_models["sequence_classification"], cores=1) == (1, None)


def test_what_the_user_gives_wins(tiny_models):
    model = tiny_models["sequence_classification"]
    assert settled(model, cores=2, workers="1") == (1, None)
    assert settled(model, cores=2, workers="3", torch_threads="2") == (3, 2)
    assert settled(model, cores=4, torch_threads="2") == (4, 2)


def test_generation_and_large_encoders_keep_one_worker(tiny_models, tmp_path):
    assert settled(tiny_models["llama"], cores=2) == (1, None)  # one engine batches every request
    large = tmp_path / "large"
    large.mkdir()
    for entry in tiny_models["sequence_classification"].iterdir():
        (large / entry.name).symlink_to(entry)
    (large / "extra.safetensors").write_bytes(b"")
    os.truncate(large / "extra.safetensors", SMALL_ENCODER_BYTES + 1)  # sparse: no disk used
    assert settled(large, cores=2) == (1, None)


def test_readiness_waits_for_every_worker(tmp_path):
    first, second = WorkerReadiness(2, tmp_path), WorkerReadiness(2, tmp_path)
    second._marker = tmp_path / str(os.getppid())  # a second live process of this test's family
    assert not first.all_loaded()
    first.mark_loaded()
    assert not first.all_loaded()  # one of two
    second.mark_loaded()
    assert first.all_loaded() and second.all_loaded()
    second.unmark()
    assert not first.all_loaded()


def test_a_dead_workers_marker_does_not_count(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / str(gone.pid)).touch()
    readiness = WorkerReadiness(2, tmp_path)
    readiness.mark_loaded()
    assert not readiness.all_loaded()
    assert WorkerReadiness(1, tmp_path / "unused").all_loaded()  # one worker needs no markers


@pytest.mark.skipif(usable_cores() < 2, reason="one worker per core needs two cores")
def test_served_with_a_worker_per_core_every_request_succeeds_once_ready(tiny_models, tmp_path):
    model = {"model_dir": str(tiny_models["sequence_classification"])}
    server = ServerProcess(model, tmp_path / "server.log", default_workers=True)
    try:
        server.wait_ready()
        # Right after /readyz says ready, every worker answers: none is still loading its model.
        answers = [
            httpx.post(f"{server.url}/v1/models/model:predict", json={"instances": ["hello there"]}, timeout=30)
            for _ in range(24)
        ]
        assert [answer.status_code for answer in answers] == [200] * 24
        workers = [
            p for p in psutil.Process(server.process.pid).children(recursive=True) if "--worker-id" in p.cmdline()
        ]
        assert len(workers) == min(usable_cores(), 8)
    finally:
        server.stop()
