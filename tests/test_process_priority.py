"""engines/process_priority.py on real processes: every thread of the processes an engine started is lowered to the
nice value, none is raised, and this process is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from engines.process_priority import new_processes_at, thread_ids
from settings.arguments import ArgumentError, parse_arguments

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread nice values are Linux's"),
    pytest.mark.skipif(os.getpriority(os.PRIO_PROCESS, 0) > 7, reason="the runner is niced too far to test below it"),
]

# A child with three threads besides its main one, like an engine core with its OpenMP threads.
THREADED_CHILD = "import threading, time\n[threading.Thread(target=time.sleep, args=(60,)).start() for _ in range(3)]\n"


BASE = os.getpriority(os.PRIO_PROCESS, 0)  # children start at the test runner's own value (0 unless run niced)


def thread_nices(pid: int) -> list[int]:
    return [os.getpriority(os.PRIO_PROCESS, tid) for tid in thread_ids(pid)]


@pytest.fixture
def start_child() -> Iterator:
    started: list[subprocess.Popen[bytes]] = []

    def start(nice: int = 0) -> int:
        command = [sys.executable, "-c", f"import os; os.nice({nice})\n{THREADED_CHILD}"]  # nice above BASE
        child = subprocess.Popen(command)
        started.append(child)
        deadline = time.monotonic() + 20
        while len(thread_ids(child.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        return child.pid

    yield start
    for child in started:
        child.kill()
        child.wait()


def test_every_thread_of_a_new_process_is_lowered_and_this_process_is_not(start_child) -> None:
    own_before = thread_nices(os.getpid())
    with new_processes_at(BASE + 7, "test"):
        child = start_child()
        assert thread_nices(child) == [BASE] * 4
    assert thread_nices(child) == [BASE + 7] * 4
    assert thread_nices(os.getpid()) == own_before


def test_a_process_already_lower_keeps_its_value_and_older_processes_are_untouched(start_child) -> None:
    older = start_child()
    with new_processes_at(BASE + 5, "test"):
        already_low = start_child(nice=12)
    assert thread_nices(already_low) == [BASE + 12] * 4  # never raised: that would need privilege
    assert thread_nices(older) == [BASE] * 4


def test_nice_zero_changes_nothing(start_child) -> None:
    with new_processes_at(0, "test"):
        child = start_child()
    assert thread_nices(child) == [BASE] * 4


def test_the_argument_is_off_by_default_and_bounded() -> None:
    assert parse_arguments({}, environ={}).engine_nice == 0
    assert parse_arguments({"engine_nice": "5"}, environ={}).engine_nice == 5
    for refused in ("-1", "20"):
        with pytest.raises(ArgumentError, match="engine_nice"):
            parse_arguments({"engine_nice": refused}, environ={})
