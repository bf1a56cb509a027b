"""The PNG figures of the report and the comparison, drawn with matplotlib.

Figures are ``matplotlib.figure.Figure`` objects saved by the Agg canvas (the
backend for files): pyplot is never imported, so no display is needed and the
process's global backend is left alone.

A saliency map is shown as its magnitude (``|s|``, summed over channels when
they were kept), scaled to its 99th percentile, as a heat map whose opacity
grows with the value, laid over the image it explains. A map stored at a lower
resolution (``downsample``) is stretched over the same extent as the image.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

HEAT = "inferno"
DPI = 100
_GREY = "#6b7280"
#: The outline of a candidate shortcut region: bright green, apart from the heat map's colours and the mask's cyan.
REGION = "#4ade80"


def _save(figure: Figure, path: str) -> str:
    figure.savefig(path, format="png", dpi=DPI)
    return path


def heat(saliency: np.ndarray) -> np.ndarray:
    """``[H, W]`` magnitude of a map scaled to [0, 1] (its 99th percentile is 1)."""
    magnitude = np.abs(np.asarray(saliency, np.float64))
    if magnitude.ndim == 3:
        magnitude = magnitude.sum(axis=-1)
    magnitude = np.nan_to_num(magnitude)
    scale = float(np.percentile(magnitude, 99)) or float(magnitude.max()) or 1.0
    return np.clip(magnitude / scale, 0.0, 1.0)


def _heat_rgba(saliency: np.ndarray, opaque: bool) -> np.ndarray:
    value = heat(saliency)
    rgba = colormaps[HEAT](value)
    if not opaque:
        rgba[..., 3] = 0.15 + 0.75 * value
    return rgba


def _box(axes, box) -> None:
    """Outlines ``box`` (``[y0, x0, y1, x1]``, input pixels, end exclusive) on ``axes``; nothing when None."""
    if box is None:
        return
    from matplotlib.patches import Rectangle

    y0, x0, y1, x1 = box
    for colour, width in (("#111827", 3.0), (REGION, 1.5)):  # a dark rim keeps the box visible on any image
        axes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=width))


def _panel(axes, picture, saliency, title: str, size: tuple, box=None) -> None:
    """One panel: the image alone (``saliency`` None) or the map over the image; ``box`` outlined on either."""
    height, width = size
    extent = (0, width, height, 0)
    axes.set_axis_off()
    axes.set_title(title, fontsize=8, color=_GREY, pad=2)
    has_image = picture is not None and picture.image is not None
    if has_image:
        axes.imshow(picture.image, cmap="gray" if picture.image.ndim == 2 else None, vmin=0, vmax=1,
                    extent=extent, interpolation="nearest")
    if saliency is not None:
        axes.imshow(_heat_rgba(saliency, opaque=not has_image), extent=extent, interpolation="bilinear")
        if picture is not None and picture.mask is not None and picture.mask.any() and not picture.mask.all():
            axes.contour(np.arange(width) + 0.5, np.arange(height) + 0.5, picture.mask.astype(float),
                         levels=[0.5], colors="#22d3ee", linewidths=0.8)
    elif not has_image:
        axes.add_patch(_placeholder_patch(width, height))
        axes.text(width / 2, height / 2, "image\nunavailable", ha="center", va="center", fontsize=8, color=_GREY)
    _box(axes, box)
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)


def _placeholder_patch(width: int, height: int):
    from matplotlib.patches import Rectangle

    return Rectangle((0, 0), width, height, facecolor="#f3f4f6", edgecolor="#d1d5db", hatch="//")


def tile(path: str, picture, saliency: np.ndarray, size: tuple, box=None) -> str:
    """A gallery tile: the image, and the map over the image; returns ``path``.

    Args:
        path: the PNG file to write.
        picture: a :class:`pipelines.report.run_data.Picture` (its image may be missing).
        saliency: the stored map.
        size: (H, W) of the model input, the extent both panels cover.
        box: a region ``[y0, x0, y1, x1]`` (input pixels, end exclusive) outlined on both panels, or None.
    """
    figure = Figure(figsize=(3.2, 1.7))
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.88, wspace=0.06)
    first, second = figure.subplots(1, 2)
    _panel(first, picture, None, "image", size, box)
    _panel(second, picture, saliency, "saliency", size, box)
    return _save(figure, path)


def compare_tile(path: str, picture, map_a: np.ndarray, map_b: np.ndarray, size: tuple,
                 titles: tuple = ("A", "B")) -> str:
    """A comparison tile: the image, map A over it, map B over it; returns ``path``."""
    figure = Figure(figsize=(4.6, 1.7))
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.88, wspace=0.06)
    panels = figure.subplots(1, 3)
    _panel(panels[0], picture, None, "image", size)
    _panel(panels[1], picture, map_a, titles[0], size)
    _panel(panels[2], picture, map_b, titles[1], size)
    return _save(figure, path)


def histogram(path: str, values: np.ndarray, title: str, span: tuple | None = None, bins: int = 30,
              marks: dict | None = None) -> str:
    """A histogram of the finite ``values`` over ``span`` (default: their range); returns ``path``.

    ``marks`` draws labelled vertical lines, e.g. ``{"mean": 0.4}``.
    """
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    figure = Figure(figsize=(3.6, 2.4))
    axes = figure.subplots()
    axes.hist(values, bins=bins, range=span, color="#3b6fd8", edgecolor="white", linewidth=0.4)
    for index, (label, value) in enumerate((marks or {}).items()):
        if value is not None and np.isfinite(value):
            axes.axvline(value, color=("#dc2626", "#16a34a", "#9333ea")[index % 3], linewidth=1,
                         label=f"{label} {value:.3f}")
    if marks:
        axes.legend(fontsize=7, frameon=False)
    axes.set_title(f"{title} (n={values.size})", fontsize=9)
    axes.tick_params(labelsize=7)
    axes.set_ylabel("maps", fontsize=8)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    figure.tight_layout()
    return _save(figure, path)


def density(path: str, x: np.ndarray, y: np.ndarray, title: str, bins: int = 24) -> str:
    """A 2-D histogram of positions in [0, 1] image coordinates (y down, as in the image)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    figure = Figure(figsize=(3.6, 2.4))
    axes = figure.subplots()
    counts, _, _ = np.histogram2d(y[keep], x[keep], bins=bins, range=[[0, 1], [0, 1]])
    shown = axes.imshow(counts, extent=(0, 1, 1, 0), cmap="Blues", interpolation="nearest")
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    axes.set_title(f"{title} (n={int(keep.sum())})", fontsize=9)
    axes.set_xlabel("x", fontsize=8)
    axes.set_ylabel("y", fontsize=8)
    axes.tick_params(labelsize=7)
    figure.tight_layout()
    return _save(figure, path)


def cascade(path: str, steps: list[dict], convergence: float | None = None) -> str:
    """The randomisation cascade: rank correlation against the number of layers randomised (top first)."""
    figure = Figure(figsize=(4.2, 2.6))
    axes = figure.subplots()
    layers = [step.get("layers_randomised") for step in steps]
    values = [np.nan if step.get("rank_correlation") is None else step["rank_correlation"] for step in steps]
    axes.plot(layers, values, marker="o", color="#3b6fd8", label="original vs randomised")
    for layer, value, step in zip(layers, values, steps):
        axes.annotate(str(step.get("down_to", "")), (layer, value), fontsize=6, color=_GREY,
                      xytext=(3, 3), textcoords="offset points")
    if convergence is not None:
        axes.axhline(convergence, color="#16a34a", linestyle="--", linewidth=1, label="split-half (convergence)")
    axes.axhline(0, color="#d1d5db", linewidth=0.8)
    axes.set_ylim(-1.05, 1.05)
    axes.set_xlabel("layers randomised (from the top)", fontsize=8)
    axes.set_ylabel("rank correlation", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.legend(fontsize=7, frameon=False, loc="lower left")
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    figure.tight_layout()
    return _save(figure, path)


def audit_maps(path: str, panels: list, cell: int, size: tuple, box=None, width: float = 1.25) -> str:
    """A row of audit maps (unit-mass, ``[h, w]`` cells), each over the input's extent; returns ``path``.

    Args:
        path: the PNG file to write.
        panels: ``[(title, map or None), ...]``; a None map is drawn as an empty, hatched panel.
        cell: input pixels per cell side (the last row and column of cells may be cut by the input's edge).
        size: (H, W) of the model input.
        box: a region ``[y0, x0, y1, x1]`` in input pixels outlined on every panel, or None.
        width: inches per panel (the figure stays a thumbnail).
    """
    height, width_px = size
    figure = Figure(figsize=(width * len(panels), width * 1.12))
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.84, wspace=0.08)
    axes_row = np.atleast_1d(figure.subplots(1, len(panels)))
    for axes, (title, values) in zip(axes_row, panels):
        axes.set_axis_off()
        axes.set_title(title, fontsize=8, color=_GREY, pad=2)
        if values is None:
            axes.add_patch(_placeholder_patch(width_px, height))
        else:
            values = np.asarray(values, np.float64)
            # Cells cover cell x cell input pixels, so the grid may reach past the input's edge: clipped below.
            axes.imshow(_heat_rgba(values, opaque=True), interpolation="nearest",
                        extent=(0, values.shape[1] * cell, values.shape[0] * cell, 0))
        _box(axes, box)
        axes.set_xlim(0, width_px)
        axes.set_ylim(height, 0)
    return _save(figure, path)


#: The difference of two mean maps: red where this run puts more mass, blue where the previous one did.
DIVERGING = "RdBu_r"


def drift_maps(path: str, previous: np.ndarray, current: np.ndarray, cell: int, size: tuple,
               titles: tuple = ("previous", "this run", "difference"), width: float = 1.25) -> str:
    """A class's mean map in the previous run and in this one, on one scale, and their difference; returns ``path``.

    Args:
        path: the PNG file to write.
        previous, current: unit-mass mean maps ``[h, w]`` on the same audit grid.
        cell: input pixels per cell side.
        size: (H, W) of the model input.
        titles: the three panels' titles.
        width: inches per panel.
    """
    previous, current = (np.nan_to_num(np.asarray(values, np.float64)) for values in (previous, current))
    difference = current - previous
    scale = float(np.percentile(np.concatenate([previous.ravel(), current.ravel()]), 99)) or 1.0
    spread = float(np.abs(difference).max()) or 1.0  # symmetric: white is no change
    images = [colormaps[HEAT](np.clip(previous / scale, 0, 1)), colormaps[HEAT](np.clip(current / scale, 0, 1)),
              colormaps[DIVERGING](np.clip(0.5 + 0.5 * difference / spread, 0, 1))]
    height, width_px = size
    figure = Figure(figsize=(width * 3, width * 1.12))
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.84, wspace=0.08)
    for axes, title, rgba in zip(figure.subplots(1, 3), titles, images):
        axes.set_axis_off()
        axes.set_title(title, fontsize=8, color=_GREY, pad=2)
        axes.imshow(rgba, interpolation="nearest", extent=(0, rgba.shape[1] * cell, rgba.shape[0] * cell, 0))
        axes.set_xlim(0, width_px)
        axes.set_ylim(height, 0)
    return _save(figure, path)


def counterfactual(path: str, outcome: dict) -> str:
    """Bars of a region's counterfactual effects against their random-region controls; returns ``path``.

    Args:
        path: the PNG file to write.
        outcome: the evidence's ``counterfactual``: ``drop``, ``drop_control``, ``flip``, ``flip_control``
            (either pair may be None) and ``margin``, the lead over the control that confirms the region.
    """
    pairs = [(label, outcome.get(name), outcome.get(f"{name}_control"))
             for name, label in (("drop", "probability drop\n(region removed)"),
                                 ("flip", "share flipped\n(region pasted)"))
             if outcome.get(name) is not None]
    margin = outcome.get("margin")
    figure = Figure(figsize=(3.4, 2.3))
    axes = figure.subplots()
    for index, (label, value, control) in enumerate(pairs):
        axes.bar(index - 0.18, value, width=0.34, color="#dc2626", label="region" if index == 0 else None)
        axes.bar(index + 0.18, control or 0.0, width=0.34, color="#9ca3af",
                 label="random region (control)" if index == 0 else None)
        if margin is not None and control is not None:  # the bar must reach this line to confirm
            axes.hlines(control + margin, index - 0.36, index + 0.36, colors="#111827", linestyles="--",
                        linewidth=1, label=f"control + margin {margin:g}" if index == 0 else None)
    if not pairs:
        axes.text(0.5, 0.5, "not tested", ha="center", va="center", fontsize=9, color=_GREY,
                  transform=axes.transAxes)
    heights = [value for _, *pair in pairs for value in pair if value is not None] + [0.0]
    top = max(heights) + (margin or 0.0)
    axes.set_ylim(min(0.0, min(heights)) * 1.1, (top or 1.0) * 1.6)  # headroom for the legend above the bars
    axes.set_xticks(range(len(pairs)), [label for label, _, _ in pairs], fontsize=7)
    axes.axhline(0, color="#d1d5db", linewidth=0.8)
    axes.tick_params(labelsize=7)
    if pairs:
        axes.legend(fontsize=6, frameon=False, loc="upper right")
    confirmed = outcome.get("confirmed")
    axes.set_title("counterfactuals: " + {True: "confirmed", False: "not confirmed"}.get(confirmed, "inconclusive"),
                   fontsize=8)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    figure.tight_layout()
    return _save(figure, path)


#: Colours of the lines of a trend (one per series; no red or yellow: those mark failing and warning points).
_SERIES = ("#3b6fd8", "#16a34a", "#9333ea", "#0891b2", "#db2777", "#475569", "#65a30d", "#7c2d12")
_MARKS = {"warn": ("#e0b400", "s"), "fail": ("#b42318", "X")}


def trend(path: str, runs: list[str], series: dict, title: str, ylabel: str, threshold: float | None = None,
          statuses: dict | None = None, labels_shown: int = 12) -> str:
    """Values over a sequence of runs, one line per series; returns ``path``.

    Args:
        path: the PNG file to write.
        runs: the runs' ids, in order (the x axis; at most ``labels_shown`` of them are written under it).
        series: ``{name: [value or None per run]}``; a run whose value is None has no point (the line joins the
            points on either side). One series alone draws no legend.
        title: the heading.
        ylabel: the y axis's label.
        threshold: a dashed horizontal line (a check's threshold), or None.
        statuses: ``{name: [status or None per run]}``: ``warn`` and ``fail`` points get a mark.
    """
    figure = Figure(figsize=(4.4, 2.7))
    axes = figure.subplots()
    x, marked = np.arange(len(runs)), set()
    for index, (name, values) in enumerate(series.items()):
        y = np.array([np.nan if value is None else float(value) for value in values], np.float64)
        colour, known = _SERIES[index % len(_SERIES)], np.isfinite(y)
        axes.plot(x[known], y[known], marker="o", markersize=3.5, linewidth=1.3, color=colour, label=name)
        for status, (mark_colour, marker) in _MARKS.items():
            flagged = [i for i, value in enumerate((statuses or {}).get(name) or ()) if value == status]
            if flagged:
                axes.scatter(x[flagged], y[flagged], s=40, marker=marker, color=mark_colour, zorder=3,
                             label=None if status in marked else status)
                marked.add(status)
    if threshold is not None:
        axes.axhline(threshold, color=_GREY, linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    step = max(1, -(-len(runs) // labels_shown))
    axes.set_xticks(x[::step], [runs[i] for i in range(0, len(runs), step)], fontsize=6, rotation=30, ha="right")
    axes.set_xlim(-0.5, len(runs) - 0.5)
    axes.set_title(title, fontsize=9)
    axes.set_ylabel(ylabel, fontsize=8)
    axes.tick_params(axis="y", labelsize=7)
    axes.ticklabel_format(axis="y", useOffset=False)  # plain values, not "1e-8 + 0.91" for a flat series
    shown = [float(value) for values in series.values() for value in values if value is not None]
    shown = [value for value in shown if np.isfinite(value)]
    if shown and max(shown) - min(shown) < 1e-3 * max(1.0, abs(max(shown))):  # flat: a readable range around it
        middle = (max(shown) + min(shown)) / 2
        axes.set_ylim(middle - 0.05 * max(1.0, abs(middle)), middle + 0.05 * max(1.0, abs(middle)))
    if len(series) > 1 or threshold is not None or statuses:
        axes.legend(fontsize=6, frameon=False, loc="best")
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    figure.tight_layout()
    return _save(figure, path)
