"""Printing a benchmark's table and saving its figures as JSON under benchmarks/results/."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def write_results(name: str, figures: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    machine = {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__}
    path.write_text(json.dumps({"benchmark": name, "machine": machine, **figures}, indent=2))
    print(f"\nwrote {path}")
    return path
