"""The statistics behind benchmarks.pooled_ratios: the median's confidence interval, the pooling of runs'
pairs, the target's verdict and the choice of runs of the same server code."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from benchmarks import pooled_ratios
from benchmarks.paired_ratios import RATIO_KEYS, median_interval


@pytest.mark.parametrize(
    ("n", "ranks"),
    [(5, None), (6, (1, 6)), (12, (3, 10)), (20, (6, 15)), (48, (17, 32)), (100, (40, 61))],
)
def test_the_medians_interval_takes_the_order_statistics_of_binomial_tables(n: int, ranks: tuple | None) -> None:
    # Ranks from the usual tables of the sign test's confidence interval for a median, at 95%.
    assert median_interval([float(i) for i in range(1, n + 1)]) == (None if ranks is None else tuple(map(float, ranks)))


def test_the_medians_interval_covers_the_true_median_at_least_as_often_as_it_says() -> None:
    generator = random.Random(7)
    true_median = 1.0  # lognormal(0, sigma): a skewed ratio whose median is exp(0)
    trials, covered = 2000, 0
    for _ in range(trials):
        ratios = [generator.lognormvariate(0.0, 0.15) for _ in range(24)]
        low, high = median_interval(ratios)  # type: ignore[misc]
        covered += low <= true_median <= high
    assert covered / trials >= 0.94  # 24 values: the interval's exact level is 97.7%


def test_the_interval_does_not_depend_on_the_values_order() -> None:
    values = [1.3, 0.9, 1.1, 1.0, 1.2, 0.95, 1.05, 1.15]
    assert median_interval(values) == median_interval(sorted(values, reverse=True)) == (0.9, 1.3)


def run(ttft: list[float], tokens: list[float], commit: str | None = "abc", changed: bool = False) -> dict:
    pairs = {
        "output_tokens_per_s": tokens,
        "ttft_p50_ms": ttft,
        "headers_p50_ms": ttft,
        "api_cpu_us_per_token": [1.0] * len(ttft),
    }
    return {
        "reps": len(ttft),
        "concurrency": [32],
        "server_code": {"commit": commit, "changed": changed},
        "ours_over_vllm_paired": {"32": pairs},
    }


def test_pooling_concatenates_every_runs_pairs_per_concurrency() -> None:
    pooled = pooled_ratios.pool([run([1.0, 1.2], [0.9, 1.0]), run([1.1], [1.0])])
    assert pooled["ours/vllm"]["32"]["ttft_p50_ms"] == [1.0, 1.2, 1.1]
    assert pooled["ours/vllm"]["32"]["output_tokens_per_s"] == [0.9, 1.0, 1.0]
    assert "ours/ceiling" not in pooled  # a run without the ceiling adds none of its pairs


def test_a_ceiling_that_served_our_whole_app_is_pooled_apart() -> None:
    bare = run([1.0], [1.0])
    bare["ours_over_ceiling_paired"] = bare["ours_over_vllm_paired"]
    whole_app = {**bare, "ceiling_serves": "service"}
    pooled = pooled_ratios.pool([bare, whole_app])
    assert pooled["ours/ceiling"]["32"]["ttft_p50_ms"] == [1.0]
    assert pooled["ours/ceiling[service]"]["32"]["ttft_p50_ms"] == [1.0]
    assert pooled["ours/vllm"]["32"]["ttft_p50_ms"] == [1.0, 1.0]


def test_the_verdict_reads_the_median_then_the_intervals_far_end() -> None:
    def figure(values: list[float]) -> dict:
        return pooled_ratios.summary(values, 0.95)

    tokens = figure([1.0] * 12)
    assert pooled_ratios.verdict(tokens, figure([1.0 + i / 100 for i in range(12)])) == "met, interval too"
    # median 1.05, but the interval's upper end (x10 of 12) is 1.15: not sure of the target
    spread = [0.95, 0.97, 0.99, 1.01, 1.03, 1.04, 1.06, 1.07, 1.09, 1.15, 1.2, 1.3]
    assert statistics.median(spread) == pytest.approx(1.05)
    assert pooled_ratios.verdict(tokens, figure(spread)) == "met on the median, not on the interval"
    assert pooled_ratios.verdict(figure([0.9] * 12), figure([1.0] * 12)) == "MISSED"
    assert pooled_ratios.verdict(figure([1.0] * 3), figure([1.0] * 3)).startswith("met on the median (too few")


def test_runs_are_chosen_by_the_checkouts_server_code_on_an_unchanged_tree(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pooled_ratios, "server_code", lambda: {"commit": "abc", "changed": False})
    runs = {
        "vllm_side_by_side-1.json": run([1.0], [1.0]),
        "vllm_side_by_side-2.json": run([1.0], [1.0], commit="def"),  # other server code
        "vllm_side_by_side-3.json": run([1.0], [1.0], changed=True),  # the tree changed it further
        "vllm_side_by_side-4.json": {**run([1.0], [1.0]), "server_code": None},  # before runs recorded it
        "vllm_side_by_side-5.json": run([1.0], [1.0]),
        "layer_costs-6.json": run([1.0], [1.0]),
    }
    for name, figures in runs.items():
        (tmp_path / name).write_text(json.dumps(figures))
    chosen = [path.name for path in pooled_ratios.same_code_runs(tmp_path)]
    assert chosen == ["vllm_side_by_side-1.json", "vllm_side_by_side-5.json"]


def test_pooled_medians_take_every_repetition_of_runs_with_vllms_server_in_the_same_turns() -> None:
    def level(*ttfts: float) -> dict:
        figures = dict.fromkeys(RATIO_KEYS, 1.0) | {"requests": 40, "errors": 0}
        return {"runs": [figures | {"ttft_p50_ms": ttft} for ttft in ttfts]}

    with_vllm = {"targets": {"ours": {"levels": {"32": level(10, 12)}}, "vllm": {"levels": {"32": level(9, 11)}}}}
    also = {"targets": {"ours": {"levels": {"32": level(14)}}, "vllm": {"levels": {"32": level(13)}}}}
    ours_alone = {"targets": {"ours": {"levels": {"32": level(100)}}}, "ceiling_serves": "service"}
    medians = pooled_ratios.pooled_medians([with_vllm, also, ours_alone], "32")
    assert medians["ours"]["ttft_p50_ms"] == 12 and medians["vllm"]["ttft_p50_ms"] == 11
