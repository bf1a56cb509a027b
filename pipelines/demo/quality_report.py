"""The quality study's outputs for people: Markdown tables and a PNG grid of example maps."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipelines.demo.quality_figures import DILATIONS, REGIONS, dilate


def _colour_map(saliency: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """|map| scaled to its 99th percentile, black-red-yellow; the object's outline dotted in cyan just outside it."""
    magnitude = np.abs(saliency)
    scale = np.percentile(magnitude, 99) or 1.0
    value = np.clip(magnitude / scale, 0, 1)
    rgb = np.stack([np.clip(2 * value, 0, 1), np.clip(2 * value - 1, 0, 1), np.zeros_like(value)], axis=-1)
    rows, cols = np.indices(mask.shape)
    outline = dilate(mask[None], 1)[0] & ~mask & ((rows + cols) % 2 == 0)
    rgb[outline] = (0.0, 0.9, 0.9)
    return (rgb * 255).astype(np.uint8)


def save_examples(path: str, images_uint8, masks, columns: list[tuple[str, np.ndarray]], zoom: int = 3) -> None:
    """Saves a PNG grid of example maps: one row per image.

    Columns: the image, its mask, then each ``(title, maps [B, H, W])`` as
    |map| in black-red-yellow with the object's outline dotted in cyan. The
    titles are drawn only when Pillow is installed.

    Args:
        path: the PNG file to write.
        images_uint8: the images, ``uint8 [B, H, W, 3]``.
        masks: their object masks, ``bool [B, H, W]``.
        columns: ``(title, maps)`` pairs, maps in the images' order.
        zoom: pixels per image pixel.
    """
    count, height, width = masks.shape
    pad, title_height = 4, 14
    panels = ["image", "mask"] + [title for title, _ in columns]
    cell_w, cell_h = width * zoom + pad, height * zoom + pad
    canvas = np.full((title_height + count * cell_h, len(panels) * cell_w, 3), 255, np.uint8)
    for row in range(count):
        tiles = [images_uint8[row], np.repeat((masks[row] * 255).astype(np.uint8)[..., None], 3, axis=-1)]
        tiles += [_colour_map(maps[row], masks[row]) for _, maps in columns]
        for col, tile in enumerate(tiles):
            big = np.repeat(np.repeat(tile, zoom, axis=0), zoom, axis=1)
            top, left = title_height + row * cell_h, col * cell_w
            canvas[top:top + height * zoom, left:left + width * zoom] = big
    try:
        from PIL import Image, ImageDraw  # optional: titles only
        picture = Image.fromarray(canvas)
        draw = ImageDraw.Draw(picture)
        for col, title in enumerate(panels):
            draw.text((col * cell_w + 2, 1), title.replace("σ", "sigma"), fill=(0, 0, 0))
        picture.save(path)
    except ImportError:
        tf.io.write_file(path, tf.io.encode_png(canvas))


def _ci(cell: dict, digits: int = 3) -> str:
    """``mean [low, high]`` of a figure's interval."""
    low, high = cell["ci95"]
    return f"{cell['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _delta(cell: dict | None) -> str:
    """A signed difference with its interval, or a dash when there is none."""
    if cell is None:
        return "—"
    low, high = cell["ci95"]
    return f"{cell['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


def markdown(report: dict) -> str:
    """The study's tables as Markdown.

    Args:
        report: the study's report (see :func:`pipelines.demo.quality_study.run_study`).

    Returns:
        The chance level, the main table, where the mass goes, the noisy-copy
        diagnostics and the control model's table (the last two when the report has them).
    """
    chance = report["chance"]
    lines = [f"Chance level (mean object area share): **{chance:.4f}** over {report['images']} images "
             f"(object dilated by 2 px: {report['dilated_chance']['2']:.4f}, the chance of 'peak ≤2 px').", ""]
    lines += ["| configuration | σ abs (mean) | mass in mask [95% CI] | ×chance | Δ mass vs gradient [95% CI] "
              "| pointing [95% CI] | ×chance | Δ pointing vs gradient | peak ≤2 px from object | s (ms/img) |",
              "|---|---:|---|---:|---|---|---:|---|---:|---:|"]
    for row in report["configs"]:
        lines.append(f"| {row['config']} | {row['sigma_abs_mean']:.3f} | {_ci(row['mass'])} | "
                     f"{row['mass_over_chance']:.1f} | {_delta(row.get('mass_minus_gradient'))} | "
                     f"{_ci(row['pointing'], 2)} | {row['pointing_over_chance']:.1f} | "
                     f"{_delta(row.get('pointing_minus_gradient'))} | {row['pointing_dilated_2']['mean']:.2f} | "
                     f"{row['seconds']:.1f} ({row['ms_per_image']:.0f}) |")
    lines += ["", "Where the mass goes (share of |map| mass; cumulative dilations, then disjoint rings):", ""]
    dil = report["dilated_chance"]
    head = ["configuration", "tight", "+1 px", "+2 px", "+4 px"] + list(REGIONS) + ["top 5% px"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines.append("| *area (chance)* | " + f"{chance:.3f} | " + " | ".join(f"{dil[str(r)]:.3f}" for r in DILATIONS)
                 + " | " + " | ".join(f"{report['region_area'][name]:.3f}" for name in REGIONS) + " | 0.050 |")
    for row in report["configs"]:
        if row["name"] in ("gradient", "SmoothGrad") and (row["samples"] in (1, 50) or row["noise"] < 0.05) \
                and row["noise_mode"] == "relative" or row["name"] in ("signed mean", "VarGrad", "SmoothGrad²"):
            cells = [row["mass"]["mean"]] + [row[f"mass_dilated_{r}"]["mean"] for r in DILATIONS]
            cells += [row[f"region {name}"]["mean"] for name in REGIONS] + [row["top5pct_mass"]["mean"]]
            lines.append(f"| {row['config']} | " + " | ".join(f"{value:.3f}" for value in cells) + " |")
    for title, key in (("Noisy copies, demo model", "diagnostics"), ("Noisy copies, noise-tuned control model",
                                                                    "control_diagnostics")):
        if not report.get(key):
            continue
        lines += ["", f"{title} ({report[key][-1]['copies_per_image']} copies per image, the engine's noise):", "",
                  "| σ rel | σ abs | top-1 = clean target | most predicted class (share) | target logit "
                  "| GMP evidence on object (chance) | copy mass in mask (agreeing / not) | pooled = SG mass "
                  "| copy pointing | inside / outside mass vs clean |",
                  "|---:|---:|---:|---|---:|---|---|---:|---:|---|"]
        for row in report[key]:
            evidence = (f"{row['evidence_on_object']:.3f} ({row['evidence_chance']:.3f})"
                        if "evidence_on_object" in row else "—")
            split = " / ".join("—" if row[name] is None else f"{row[name]:.3f}"
                               for name in ("copy_mass_in_mask_if_agrees", "copy_mass_in_mask_if_not"))
            lines.append(f"| {row['sigma_rel']:g} | {row['sigma_abs_mean']:.3f} | "
                         f"{row['top1_agrees_with_clean_target']:.3f} | {row['most_predicted_class']} "
                         f"({row['most_predicted_share']:.2f}) | {row['target_logit_mean']:.2f} | {evidence} | "
                         f"{row['copy_mass_in_mask']:.3f} ({split}) | {row['pooled_mass_in_mask']:.3f} | "
                         f"{row['copy_pointing']:.3f} | {row['inside_mass_vs_clean_median']:.2f} / "
                         f"{row['outside_mass_vs_clean_median']:.2f} |")
    if report.get("control_configs"):
        control = report["control"]
        lines += ["", f"Control model (demo model fine-tuned {control['epochs']} epochs with input noise "
                      f"σ ~ U(0, {control['max_noise_abs']}); clean test accuracy {control['clean_accuracy']:.3f}):",
                  "", "| configuration | mass in mask [95% CI] | Δ mass vs its gradient | pointing [95% CI] "
                      "| Δ pointing vs its gradient | mass +2 px | peak ≤2 px |", "|---|---|---|---|---|---:|---:|"]
        for row in report["control_configs"]:
            lines.append(f"| {row['config']} | {_ci(row['mass'])} | {_delta(row.get('mass_minus_gradient'))} | "
                         f"{_ci(row['pointing'], 2)} | {_delta(row.get('pointing_minus_gradient'))} | "
                         f"{row['mass_dilated_2']['mean']:.3f} | {row['pointing_dilated_2']['mean']:.2f} |")
    return "\n".join(lines) + "\n"
