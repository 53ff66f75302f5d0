"""PNG charts beside a benchmark's table and JSON (matplotlib, Agg backend: no display needed).

Every benchmark calls one of these with the figures it printed, and the chart is written next to the
JSON of the same run (`chart_path(json_path)`), e.g. throughput and p99 latency by concurrency for
this server, with the in-process ceiling and any peers measured as reference lines.

    from benchmarks.charts import chart_path, concurrency_chart
    concurrency_chart(chart_path(json_path), "MiniLM, V1 predict", {"this server": {1: 49, 8: 106}},
                      latency={"this server": {1: 21, 8: 80}}, references={"in-process, batch 32": 204})
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Series = Mapping[str, Mapping[int, float]]
_STYLE = {
    "figure.dpi": 100,
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def chart_path(json_path: Path) -> Path:
    """The PNG beside a results JSON of `benchmarks.report.write_results`."""
    return json_path.with_suffix(".png")


def concurrency_chart(
    out: Path,
    title: str,
    throughput: Series,
    *,
    latency: Series | None = None,
    references: Mapping[str, float] | None = None,
    throughput_label: str = "requests/s",
    latency_label: str = "p99 latency (ms)",
) -> Path:
    """Throughput by concurrency (left) and latency by concurrency (right, when given), one line per
    server; `references` (e.g. the in-process ceiling, a peer's best) are dashed horizontal lines."""
    with plt.rc_context(_STYLE):
        panels = 2 if latency else 1
        figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.4), squeeze=False)
        left = axes[0][0]
        _lines(left, throughput, throughput_label)
        for index, (label, value) in enumerate((references or {}).items()):
            left.axhline(value, linestyle="--", linewidth=1, color=f"C{len(throughput) + index}", label=label)
        left.set_ylim(bottom=0)
        left.legend(frameon=False, fontsize=8)
        if latency:
            right = axes[0][1]
            _lines(right, latency, latency_label)
            right.set_ylim(bottom=0)
            right.legend(frameon=False, fontsize=8)
        figure.suptitle(title, fontsize=10)
        figure.tight_layout()
        return _save(figure, out)


def bar_chart(
    out: Path, title: str, values: Mapping[str, float], value_label: str, *, horizontal: bool = False
) -> Path:
    """One bar per label (e.g. requests/s per route), the value written on each bar; `horizontal` for long
    labels (top to bottom in the order given)."""
    with plt.rc_context(_STYLE):
        labels = list(values)
        colors = [f"C{i}" for i in range(len(labels))]
        if horizontal:
            figure, axis = plt.subplots(figsize=(6.4, 0.9 + 0.32 * len(labels)))
            bars = axis.barh(labels, [values[label] for label in labels], color=colors)
            axis.invert_yaxis()
            axis.set_xlabel(value_label)
            axis.grid(axis="y", visible=False)
        else:
            figure, axis = plt.subplots(figsize=(5.2, 3.0))
            bars = axis.bar(labels, [values[label] for label in labels], color=colors)
            axis.set_ylabel(value_label)
            axis.grid(axis="x", visible=False)
        axis.bar_label(bars, fmt="%.0f", fontsize=8)
        axis.set_title(title, fontsize=10)
        figure.tight_layout()
        return _save(figure, out)


def lines_chart(out: Path, title: str, panels: list[tuple[Series, str]], *, x_label: str, x_log2: bool = True) -> Path:
    """One panel per (series, y label), side by side, sharing an x axis (e.g. tokens per input)."""
    with plt.rc_context(_STYLE):
        figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
        for axis, (series, y_label) in zip(axes[0], panels, strict=True):
            _lines(axis, series, y_label, x_label=x_label, x_log2=x_log2)
            axis.set_ylim(bottom=0)
            axis.legend(frameon=False, fontsize=8)
        figure.suptitle(title, fontsize=10)
        figure.tight_layout()
        return _save(figure, out)


Interval = Mapping[str, Mapping[int, Mapping[str, object]]]  # name -> concurrency -> {"median", "interval"}


def interval_chart(out: Path, title: str, panels: list[tuple[Interval, str, float]]) -> Path:
    """One panel per (ratios, y label, target): each ratio's median by concurrency with its interval as an
    error bar (none when too few values), and the target as a dashed line."""
    with plt.rc_context(_STYLE):
        figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
        for axis, (ratios, y_label, target) in zip(axes[0], panels, strict=True):
            for index, (name, by_level) in enumerate(ratios.items()):
                levels = sorted(by_level)
                medians = [float(by_level[c]["median"]) for c in levels]  # type: ignore[arg-type]
                below, above = [], []
                for c, median in zip(levels, medians, strict=True):
                    low, high = by_level[c]["interval"] or (median, median)  # type: ignore[misc]
                    below.append(median - low)
                    above.append(high - median)
                shifted = [c * (1.06 ** (index - 1)) for c in levels]  # side by side, not on top of each other
                axis.errorbar(shifted, medians, yerr=[below, above], marker="o", capsize=3, label=name)
            axis.axhline(target, linestyle="--", linewidth=1, color="grey", label=f"target {target}x")
            _axes_by_level(axis, {c for by_level in ratios.values() for c in by_level}, y_label)
            axis.legend(frameon=False, fontsize=8)
        figure.suptitle(title, fontsize=10)
        figure.tight_layout()
        return _save(figure, out)


def _lines(
    axis: plt.Axes, series: Series, y_label: str, *, x_label: str = "concurrent clients", x_log2: bool = True
) -> None:
    for name, points in series.items():
        levels = sorted(points)
        axis.plot(levels, [points[c] for c in levels], marker="o", label=name)
    _axes_by_level(axis, {c for points in series.values() for c in points}, y_label, x_label=x_label, x_log2=x_log2)


def _axes_by_level(
    axis: plt.Axes, levels: set[int], y_label: str, *, x_label: str = "concurrent clients", x_log2: bool = True
) -> None:
    """An x axis with a tick at each level (e.g. concurrency), on a log2 scale unless told otherwise."""
    every = sorted(levels)
    if x_log2:
        axis.set_xscale("log", base=2)
    axis.set_xticks(every, [str(c) for c in every])
    axis.minorticks_off()
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)


def _save(figure: plt.Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    plt.close(figure)
    print(f"wrote {out}")
    return out
