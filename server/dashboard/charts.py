"""Inline SVG charts: numbers in, coordinates out (the template draws them; no script)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.dashboard.queries import OutcomePoint

WIDTH, HEIGHT = 600, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 12, 12, 28


@dataclass(frozen=True)
class OutcomeChart:
    """A campaign's cumulative successes and failures over time, and their rates at each point."""

    succeeded: str  # SVG polyline points
    failed: str
    y_max: int
    y_ticks: list[tuple[float, int]]  # (y, label)
    x_labels: list[tuple[float, str, str]]  # (x, label, text-anchor)
    rows: list[tuple[str, int, int, str]]  # time, succeeded, failed, failure rate (the table)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = _LEFT
    bottom: int = HEIGHT - _BOTTOM
    right: int = WIDTH - _RIGHT


def outcome_chart(points: Sequence[OutcomePoint]) -> OutcomeChart:
    y_max = max([1, *(max(p.succeeded, p.failed) for p in points)])
    inner_w, inner_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    n = max(1, len(points) - 1)

    def xy(i: int, value: int) -> str:
        return f"{_LEFT + inner_w * i / n:.1f},{_TOP + inner_h * (1 - value / y_max):.1f}"

    ticks = sorted({0, y_max // 2, y_max})
    labels = []
    last = len(points) - 1
    for i in sorted({0, len(points) // 2, last}) if points else []:
        anchor = "start" if i == 0 else ("end" if i == last else "middle")
        labels.append((_LEFT + inner_w * i / n, points[i].at.strftime("%H:%M:%S"), anchor))
    rows = []
    for p in points:
        finished = p.succeeded + p.failed
        rate = f"{100 * p.failed / finished:.1f} %" if finished else "n/a"
        rows.append((p.at.strftime("%Y-%m-%d %H:%M:%S"), p.succeeded, p.failed, rate))
    return OutcomeChart(
        succeeded=" ".join(xy(i, p.succeeded) for i, p in enumerate(points)),
        failed=" ".join(xy(i, p.failed) for i, p in enumerate(points)),
        y_max=y_max,
        y_ticks=[(_TOP + inner_h * (1 - t / y_max), t) for t in ticks],
        x_labels=labels,
        rows=rows,
    )
