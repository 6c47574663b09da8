"""One paper style for every kdgap figure: readable in greyscale, deterministic files.

Greyscale readability comes from never encoding a series by colour alone: every series has
its own line style and marker too (:data:`SERIES`). Files are byte-reproducible: PNGs and
PDFs are written without timestamps or software versions (``kdgap figures`` re-renders
saved results to identical files).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; figures are files
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Okabe-Ito colours (colour-blind safe) paired with distinct dashes and markers.
SERIES = [
    {"color": "#0072B2", "linestyle": "-", "marker": "o"},
    {"color": "#D55E00", "linestyle": "--", "marker": "s"},
    {"color": "#009E73", "linestyle": ":", "marker": "^"},
    {"color": "#CC79A7", "linestyle": "-.", "marker": "D"},
    {"color": "#E69F00", "linestyle": (0, (5, 1)), "marker": "v"},
    {"color": "#000000", "linestyle": (0, (1, 1)), "marker": "x"},
]

RC = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.5,
    "lines.markersize": 4,
    "svg.hashsalt": "kdgap",
    "pdf.fonttype": 42,
}


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Context manager applying kdgap's rcParams."""
    with plt.rc_context(RC):
        yield


def series(i: int) -> dict:
    """Style keywords (colour, line style, marker) of series ``i``."""
    return dict(SERIES[i % len(SERIES)])


def save(fig: Figure, stem: str | Path) -> list[Path]:
    """Save ``fig`` as ``stem.png`` and ``stem.pdf`` without timestamps; close it.

    Returns:
        The two paths written.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "png": {"Software": None},
        "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
    }
    paths = []
    for fmt, meta in metadata.items():
        path = stem.with_suffix(f".{fmt}")
        tmp = path.with_name(f".{path.name}.tmp")  # write then rename: never a half file
        fig.savefig(tmp, format=fmt, metadata=meta, bbox_inches="tight")
        os.replace(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths
