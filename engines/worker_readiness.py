"""Readiness across BentoML's worker processes: the server is ready once every worker has its model loaded.

BentoML's workers share one listening socket, so a readiness probe is answered by whichever worker accepts it.
With several workers (`workers`), one that has loaded its model would say "ready" while another
still answers 503 to the requests it accepts. So each worker, once loaded, leaves a marker named by its process
id in a folder that its siblings share (named by their common parent, BentoML's arbiter), and says ready only
when it counts as many live markers as there are workers. A worker that dies leaves a marker whose process is
gone, which does not count; its replacement adds its own once loaded.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's: a recycled pid, counted all the same
        return True
    return True


class WorkerReadiness:
    """Markers of loaded workers in a folder shared by one server's workers; one worker needs none."""

    def __init__(self, workers: int, folder: Path | None = None) -> None:
        self.workers = workers
        self.folder = folder or Path(tempfile.gettempdir()) / f"hf-serve-ready-{os.getppid()}"
        self._marker = self.folder / str(os.getpid())

    def mark_loaded(self) -> None:
        if self.workers > 1:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._marker.touch()

    def unmark(self) -> None:
        """This worker stops: its siblings (and the probe) no longer count it."""
        with contextlib.suppress(FileNotFoundError):
            self._marker.unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()  # the last worker out removes the folder

    def all_loaded(self) -> bool:
        if self.workers <= 1:
            return True
        try:
            markers = [entry.name for entry in self.folder.iterdir()]
        except FileNotFoundError:
            return False
        return sum(1 for name in markers if name.isdigit() and _alive(int(name))) >= self.workers
