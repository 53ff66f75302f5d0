"""The side-by-side target judged on the pairs of several runs of the same server code.

One run of benchmarks.vllm_side_by_side pairs ours with vLLM's server `--reps` times per concurrency (each
pair's two turns are seconds apart). At c=32 on this 2-core VM the paired TTFT ratios of one run spread by
±10% around their median (quartiles), so with 12 pairs that median moves between runs of the same code by as
much as the target's margin: three runs of one commit gave 1.11x, 0.97x and 1.05x. One run cannot say on
which side of 1.1x the server is. Pooling the pairs of every run of the same server code can: this prints
each ratio's median over all pairs with a distribution-free confidence interval (`median_interval`), and the
issue's target (at least 0.95x vLLM's output tokens/s, TTFT p50 at most 1.1x) on the median and on the
interval's far end. Prints a table, writes JSON and draws the medians with their intervals.

    .venv/bin/python -m benchmarks.pooled_ratios [FILE ...] [--confidence 0.95]

Without files it takes every vllm_side_by_side result in benchmarks/results/ whose server code (the last
commit outside benchmarks/, tests/, docs/ and *.md, recorded by the run) is the checkout's, and was not
changed in the working tree. Files given by name are pooled as they are, and their code versions listed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.charts import chart_path, interval_chart
from benchmarks.paired_ratios import TARGET_TOKENS, TARGET_TTFT, median_interval, median_of, meets_target
from benchmarks.report import RESULTS_DIR, print_table, server_code, write_results

PAIRS = (("ours", "vllm"), ("ours", "ceiling"), ("ceiling", "vllm"))
KEYS = ("output_tokens_per_s", "ttft_p50_ms", "headers_p50_ms", "api_cpu_us_per_token")


def same_code_runs(results: Path) -> dict[Path, dict[str, Any]]:
    """The side-by-side results of the checkout's server code, run on an unchanged tree, read."""
    code = server_code()
    chosen = {}
    for path in sorted(results.glob("vllm_side_by_side-*.json")):
        run = json.loads(path.read_text())
        recorded = run.get("server_code") or {}
        if code["commit"] and recorded.get("commit") == code["commit"] and recorded.get("changed") is False:
            chosen[path] = run
    return chosen


def pool(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Every run's pairs, by `label/baseline`, concurrency and figure. A ceiling that served our whole app
    (`--ceiling-serves service`) is another baseline than vLLM's app bare, and is named apart."""
    pooled: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        serves = run.get("ceiling_serves", "vllm-app")
        names = {"ceiling": "ceiling" if serves == "vllm-app" else f"ceiling[{serves}]"}
        for label, baseline in PAIRS:
            name = f"{names.get(label, label)}/{names.get(baseline, baseline)}"
            for concurrency, ratios in run.get(f"{label}_over_{baseline}_paired", {}).items():
                level = pooled.setdefault(name, {}).setdefault(concurrency, {})
                for key in KEYS:
                    level.setdefault(key, []).extend(ratios[key])
    return pooled


def pooled_medians(runs: list[dict[str, Any]], concurrency: str) -> dict[str, dict[str, Any]]:
    """Each server's median over every repetition of every run at one concurrency (the ratio of these is the
    issue's own reading: medians, then their ratio); only runs with vLLM's server in the same turns, and
    without a ceiling that served our whole app."""
    repetitions: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if "vllm" not in run["targets"]:
            continue
        for label, target in run["targets"].items():
            if label == "ceiling" and run.get("ceiling_serves", "vllm-app") != "vllm-app":
                continue
            repetitions.setdefault(label, []).extend(target["levels"].get(concurrency, {}).get("runs", []))
    medians = {label: median_of(runs) for label, runs in repetitions.items() if runs}
    return {label: {key: v for key, v in figures.items() if key != "runs"} for label, figures in medians.items()}


def summary(ratios: list[float], confidence: float) -> dict[str, Any]:
    interval = median_interval(ratios, confidence)
    return {"pairs": len(ratios), "median": statistics.median(ratios), "interval": interval}


def verdict(tokens: dict[str, Any], ttft: dict[str, Any]) -> str:
    """The target on the medians, then on the interval's far end (tok/s low, TTFT high)."""
    if not meets_target(tokens["median"], ttft["median"]):
        return "MISSED"
    if tokens["interval"] is None or ttft["interval"] is None:
        return "met on the median (too few pairs for an interval)"
    sure = meets_target(tokens["interval"][0], ttft["interval"][1])
    return "met, interval too" if sure else "met on the median, not on the interval"


def shown(figure: dict[str, Any]) -> str:
    low_high = figure["interval"]
    around = f" ({low_high[0]:.2f}-{low_high[1]:.2f})" if low_high else ""
    return f"{figure['median']:.2f}x{around}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="vllm_side_by_side results (default: see above)")
    parser.add_argument("--confidence", type=float, default=0.95)
    options = parser.parse_args()
    chosen = {path: json.loads(path.read_text()) for path in options.files} or same_code_runs(RESULTS_DIR)
    if not chosen:
        parser.error(f"no vllm_side_by_side result of this server code ({server_code()}) in {RESULTS_DIR}")
    files, runs = list(chosen), list(chosen.values())
    for path, run in chosen.items():
        code = run.get("server_code") or {}
        commit = (code.get("commit") or "unknown")[:9] + (" + changes" if code.get("changed") else "")
        print(f"{path.name}: server code {commit}, {run['reps']} reps, concurrency {run['concurrency']}")
    figures: dict[str, Any] = {"files": [path.name for path in files], "confidence": options.confidence, "pooled": {}}
    header = ["pair", "conc.", "pairs", "out tok/s", "TTFT p50", "headers p50", "API CPU/token", "target"]
    rows = []
    for name, levels in pool(runs).items():
        for concurrency in sorted(levels, key=int):
            figure = {key: summary(values, options.confidence) for key, values in levels[concurrency].items()}
            figures["pooled"].setdefault(name, {})[concurrency] = figure
            target = verdict(figure["output_tokens_per_s"], figure["ttft_p50_ms"]) if name == "ours/vllm" else ""
            pairs = str(figure["ttft_p50_ms"]["pairs"])
            rows.append([name, concurrency, pairs, *(shown(figure[key]) for key in KEYS), target])
    print(f"\nby pair, pooled: median ({options.confidence:.0%} interval of the median)")
    print_table(header, rows)
    rows = []
    for concurrency in sorted(figures["pooled"].get("ours/vllm", {}), key=int):
        medians = figures.setdefault("pooled_medians", {})[concurrency] = pooled_medians(runs, concurrency)
        ours, vllm = medians["ours"], medians["vllm"]
        tokens = ours["output_tokens_per_s"] / vllm["output_tokens_per_s"]
        ttft = ours["ttft_p50_ms"] / vllm["ttft_p50_ms"]
        met = "met" if meets_target(tokens, ttft) else "MISSED"
        rows.append([concurrency, f"{vllm['output_tokens_per_s']:.0f}", f"{ours['output_tokens_per_s']:.0f}"])
        rows[-1] += [f"{vllm['ttft_p50_ms']:.1f}", f"{ours['ttft_p50_ms']:.1f}", f"{tokens:.2f}x, {ttft:.2f}x", met]
    print("\neach server's median over every repetition, and ours / vLLM of those medians:")
    print_table(["conc.", "vLLM tok/s", "ours tok/s", "vLLM TTFT p50", "ours TTFT p50", "tok/s, TTFT", "target"], rows)
    json_path = write_results("pooled_ratios", figures)
    pooled = figures["pooled"]

    def by_level(key: str) -> dict[str, dict[int, Any]]:
        return {name: {int(c): figure[key] for c, figure in levels.items()} for name, levels in pooled.items()}

    interval_chart(
        chart_path(json_path),
        f"Pooled pairs of {len(files)} side-by-side runs: median and {options.confidence:.0%} interval",
        [
            (by_level("output_tokens_per_s"), "output tokens/s, ratio", TARGET_TOKENS),
            (by_level("ttft_p50_ms"), "TTFT p50, ratio", TARGET_TTFT),
        ],
    )


if __name__ == "__main__":
    main()
