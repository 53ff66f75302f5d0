"""Printing a benchmark's table and saving its figures as JSON under benchmarks/results/."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPOSITORY = RESULTS_DIR.parent.parent
# What a server runs: everything but the benchmarks, tests and docs. Runs whose server code is the same may be
# pooled (benchmarks.pooled_ratios) however many benchmark or README commits lie between them.
SERVER_CODE = [".", ":(exclude)benchmarks", ":(exclude)tests", ":(exclude)docs", ":(exclude)*.md"]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def server_code() -> dict[str, Any]:
    """The last commit that changed the server's code, and whether the working tree changes it further."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("log", "-1", "--format=%H", "--", *SERVER_CODE).strip()
        changed = git("status", "--porcelain", "--untracked-files=no", "--", *SERVER_CODE).strip()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. inside a Bento)
        return {"commit": None, "changed": None}
    return {"commit": commit, "changed": bool(changed)}


def write_results(name: str, figures: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    machine = {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__}
    path.write_text(json.dumps({"benchmark": name, "machine": machine, **figures}, indent=2))
    print(f"\nwrote {path}")
    return path
