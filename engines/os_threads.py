"""Thread names the operating system sees, so a thread's CPU can be told apart from outside the process."""

from __future__ import annotations

import ctypes
import sys


def name_os_thread(name: str) -> None:
    """The calling thread's name as the OS sees it (`top -H`, /proc/PID/task/TID/comm; 15 bytes on Linux), so
    per-thread CPU can be told apart from outside (benchmarks/encoder_profile.py). Nothing elsewhere."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
