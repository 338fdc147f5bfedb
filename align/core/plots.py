"""Plotting helpers shared by the reports (matplotlib, headless)."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def error_bars(values: list[float], intervals: list[list[float]]) -> list[list[float]]:
    """matplotlib's [below, above] distances from each value to its interval ends (never negative)."""
    return [[max(0.0, v - low) for v, (low, _) in zip(values, intervals, strict=True)],
            [max(0.0, high - v) for v, (_, high) in zip(values, intervals, strict=True)]]


def save(figure, path, dpi: int = 120):
    """Lay out, write and close `figure`; returns `path`."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path
