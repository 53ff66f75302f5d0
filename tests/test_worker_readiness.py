"""Readiness across worker processes (engines/worker_readiness.py): a server with several workers says ready
only once every worker has its model loaded."""

from __future__ import annotations

import os
import subprocess

import httpx
import psutil

from engines.worker_readiness import WorkerReadiness
from tests.server_process import ServerProcess


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


def test_with_two_workers_every_request_succeeds_once_ready(tiny_models, tmp_path):
    model = {"model_dir": str(tiny_models["sequence_classification"]), "workers": "2"}
    server = ServerProcess(model, tmp_path / "server.log")
    try:
        server.wait_ready()
        # Right after /readyz says ready, every worker answers: none is still loading its model.
        answers = [
            httpx.post(f"{server.url}/v1/models/model:predict", json={"instances": ["hello there"]}, timeout=30)
            for _ in range(24)
        ]
        assert [answer.status_code for answer in answers] == [200] * 24
        children = psutil.Process(server.process.pid).children(recursive=True)
        assert len([p for p in children if "--worker-id" in p.cmdline()]) == 2
    finally:
        server.stop()
