"""Calibrates the stopping rule and the stage schedule of adaptive samples (``samples="auto"``).

Two parts, in one script:

1. **Measure** (TensorFlow, about 10 minutes per model on 2 CPU cores). For each
   model (``demo``: the demo CNN on ``demo_data/``; ``second``: the
   grating-orientation model of ``benchmarks/second_task.py``) and its first
   ``--images`` test images, and for every N of a grid (every even N from 4 to
   64, then every 8 to 128): the engine's N-sample map
   (``SmoothGrad(model, samples=N, noise=0.1, batch_size=16, jit="graph")``;
   each N's noise is a prefix of the same per-image sequence, so this is
   exactly the map an adaptive run stopped at N gives), its split-half
   reliability ``r_N`` (``result.reliability``) and its agreement
   ``a_N`` = Spearman(map_N, reference), the reference being the mean of
   ``--reference`` samples (512; samples 0-511, as the fixed-N engine draws
   them). A second agreement against a disjoint reference (samples 512-1023)
   is kept as a check of the overlap. Raw arrays go to
   ``benchmarks/.cache/adaptive_calibration.npz`` (gitignored) and are reused.

2. **Simulate** (numpy only). The first half of each model's images is the
   calibration set, the second half the validation set. A rule is a schedule of
   stage boundaries and a threshold ``thr(n)``: an image stops at the first
   boundary n where ``est(r_n) = sqrt(2 r_n / (1 + r_n)) >= thr(n)``, else at
   the last one; the map it keeps is ``map_n``. For every candidate schedule
   and threshold form (``target + c/n``, ``target + c/sqrt(n)``,
   ``target + c``, ``target + z * sd_n`` with sd_n the spread of est − a at n on
   the calibration set), the smallest constant on a fine grid such that, on
   the calibration half, at least ``--slack-share`` (0.96) of the maps of
   **each** model agree with the reference at ``--target`` (0.95) or better.
   Reported for that constant, on both halves: the mean samples per image, the
   share of maps at ≥ 0.95, the smallest fixed N on the grid reaching that
   share and the gain (that N / mean samples). The rule named by ``--chosen``
   (default: the step-4 schedule with ``target + c/n``) also gets a sweep of
   its constant and the **oracle** bound of its schedule (each image stopped at
   the first boundary where its map truly agrees: no rule on that schedule
   does better). The summary goes to ``benchmarks/adaptive_calibration.json``.

Example (from the repository root; needs ``python -m pipelines.demo --out demo_data``)::

    python benchmarks/second_task.py
    python benchmarks/adaptive_calibration.py --images 192
    python benchmarks/adaptive_calibration.py --simulate-only     # re-run part 2 from the cache
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

CACHE_FILE = ROOT / "benchmarks" / ".cache" / "adaptive_calibration.npz"
SUMMARY_FILE = ROOT / "benchmarks" / "adaptive_calibration.json"
GRID = list(range(4, 65, 2)) + list(range(72, 129, 8))
FIXED = (10, 20, 30, 50, 64)
SCHEDULES = {
    "step4": [8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64],
    "geometric": [8, 12, 16, 24, 32, 48, 64],
    "doubling": [8, 16, 32, 64],
    "step4_from4": [4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64],
    "geometric_from4": [4, 6, 8, 12, 16, 24, 32, 48, 64],
    "step4_to128": [8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128],
    "geometric_to128": [8, 12, 16, 24, 32, 48, 64, 96, 128],
}
FORMS = ("c/n", "c/sqrt(n)", "c", "z*sd")


def estimate(r: np.ndarray) -> np.ndarray:
    """Spearman–Brown: the predicted rank correlation of a map with its converged map, from its split-half r."""
    r = np.clip(np.nan_to_num(np.asarray(r, np.float64), nan=0.0), 0.0, 1.0)
    return np.sqrt(2 * r / (1 + r))


def load_model_images(name: str, count: int, demo_data: str):
    """``(model, preprocessed images, keys)`` of the first ``count`` test images of ``demo`` or ``second``."""
    import keras

    if name == "demo":
        from pipelines.demo.demo_model import preprocess
        from pipelines.demo.demo_records import load_split

        split = load_split(demo_data, "test")
        model = keras.saving.load_model(os.path.join(demo_data, "model.keras"))
        return model, preprocess(split["image"][:count]), [key.decode() for key in split["id"][:count]]
    if name == "second":
        import second_task

        second_task.ensure()
        return second_task.load(count)
    raise ValueError(f"unknown model {name!r}; use demo or second")


def measure(name: str, count: int, reference: int, demo_data: str) -> dict:
    """The raw arrays of one model: ``r``, ``a``, ``a_disjoint`` ``[images, len(GRID)]``, keys, seconds."""
    from transforms.engine.smoothgrad import SmoothGrad
    from transforms.engine.statistics import rank_correlation

    model, images, keys = load_model_images(name, count, demo_data)
    common = dict(noise=0.1, batch_size=16, jit="graph")
    started = time.perf_counter()
    ref = SmoothGrad(model, samples=reference, reliability=False, **common)(images, keys).maps
    other = SmoothGrad(model, samples=reference, sample_offset=reference, reliability=False,
                       **common)(images, keys).maps
    r, a, a_disjoint = (np.zeros((len(keys), len(GRID))) for _ in range(3))
    for column, samples in enumerate(GRID):
        result = SmoothGrad(model, samples=samples, **common)(images, keys)
        r[:, column] = result.reliability
        a[:, column] = [rank_correlation(m, b) for m, b in zip(result.maps, ref)]
        a_disjoint[:, column] = [rank_correlation(m, b) for m, b in zip(result.maps, other)]
        print(f"{name} N={samples}: median r {np.nanmedian(r[:, column]):.3f}, "
              f"share a>=0.95 {np.mean(a[:, column] >= 0.95):.3f}", flush=True)
    reference_agreement = [rank_correlation(m, b) for m, b in zip(ref, other)]
    return {"r": r, "a": a, "a_disjoint": a_disjoint, "keys": np.array(keys),
            "reference_pair": np.array(reference_agreement), "seconds": time.perf_counter() - started}


def thresholds(form: str, constant: float, target: float, boundaries, sd: dict) -> np.ndarray:
    """``thr(n)`` at each boundary for a form and its constant (capped at 0.9999, as the engine caps it)."""
    n = np.asarray(boundaries, np.float64)
    extra = {"c/n": constant / n, "c/sqrt(n)": constant / np.sqrt(n), "c": np.full_like(n, constant),
             "z*sd": constant * np.array([sd[int(b)] for b in boundaries])}[form]
    return np.minimum(0.9999, target + extra)


def simulate(r, a, boundaries, thr, target: float) -> tuple[np.ndarray, np.ndarray]:
    """Samples used by each image under a rule, and whether its map then agrees with the reference at ``target``."""
    columns = [GRID.index(b) for b in boundaries]
    passes = estimate(r[:, columns]) >= thr[None, :]
    passes[:, -1] = True
    stop = np.argmax(passes, axis=1)
    used = np.asarray(boundaries)[stop]
    agreement = a[np.arange(len(a)), np.asarray(columns)[stop]]
    return used, agreement >= target


def smallest_fixed(a, share: float, target: float):
    """The smallest N on the grid whose fixed-N share of maps at ``target`` reaches ``share`` (None if none)."""
    for column, samples in enumerate(GRID):
        if np.mean(a[:, column] >= target) >= share - 1e-12:
            return samples
    return None


def evaluate(data: dict, rows: slice, boundaries, form, constant, target, sd) -> dict:
    """Per model: mean samples, share at target, samples_used quantiles, fixed-N shares and the gain."""
    out = {}
    thr = thresholds(form, constant, target, boundaries, sd)
    for name, arrays in data.items():
        r, a = arrays["r"][rows], arrays["a"][rows]
        used, ok = simulate(r, a, boundaries, thr, target)
        share = float(ok.mean())
        fixed = smallest_fixed(a, share, target)
        out[name] = {"images": int(len(a)), "mean_samples": round(float(used.mean()), 2), "share": round(share, 4),
                     "samples_used": {q: int(np.quantile(used, p, method="lower")) for q, p in
                                      (("min", 0), ("median", 0.5), ("p90", 0.9), ("max", 1))},
                     "fixed_share": {str(n): round(float(np.mean(a[:, GRID.index(n)] >= target)), 4) for n in FIXED},
                     "smallest_fixed_n_reaching_share": fixed,
                     "gain": round(fixed / float(used.mean()), 2) if fixed else None}
    return out


def spread(data: dict, rows: slice) -> dict:
    """sd of est − agreement per grid N, over the images of both models in ``rows``."""
    error = np.concatenate([estimate(d["r"][rows]) - d["a"][rows] for d in data.values()])
    return {n: float(np.std(error[:, column])) for column, n in enumerate(GRID)}


def fit(data, calibration, boundaries, form, target, slack, sd) -> float | None:
    """The smallest constant (on a fine grid) giving every model's calibration share ≥ ``slack``."""
    grid = {"c/n": np.arange(0, 1.0001, 0.005), "c/sqrt(n)": np.arange(0, 0.30001, 0.001),
            "c": np.arange(0, 0.05001, 0.0005), "z*sd": np.arange(0, 6.0001, 0.05)}[form]
    for constant in grid:
        result = evaluate(data, calibration, boundaries, form, float(constant), target, sd)
        if all(model["share"] >= slack for model in result.values()):
            return round(float(constant), 4)
    return None


def oracle(data: dict, rows: slice, boundaries, target: float) -> dict:
    """The bound of any rule on this schedule: each image stops at the first boundary where its map agrees."""
    out = {}
    for name, d in data.items():
        a = d["a"][rows]
        columns = np.array([GRID.index(b) for b in boundaries])
        reached = a[:, columns] >= target
        reached[:, -1] = True
        stop = np.argmax(reached, axis=1)
        used = np.asarray(boundaries)[stop]
        share = float(np.mean(a[np.arange(len(a)), columns[stop]] >= target))
        fixed = smallest_fixed(a, share, target)
        first = np.array([GRID[int(np.argmax(row))] if row.any() else None for row in a >= target], dtype=float)
        out[name] = {"mean_samples": round(float(used.mean()), 2), "share": round(share, 4),
                     "smallest_fixed_n_reaching_share": fixed,
                     "gain": round(fixed / float(used.mean()), 2) if fixed else None,
                     "first_grid_n_reaching_target": {"min": float(np.nanmin(first)),
                                                      "median": float(np.nanmedian(first)),
                                                      "mean": round(float(np.nanmean(first)), 2),
                                                      "p90": float(np.nanquantile(first, 0.9)),
                                                      "max": float(np.nanmax(first))}}
    return out


def per_n_table(data: dict, rows: slice, target: float) -> dict:
    """Per model and grid N: share of maps at target, median r, mean and p90 of est − agreement."""
    table = {}
    for name, d in data.items():
        est, a = estimate(d["r"][rows]), d["a"][rows]
        table[name] = {str(n): {"share": round(float(np.mean(a[:, c] >= target)), 4),
                                "median_r": round(float(np.nanmedian(d["r"][rows][:, c])), 4),
                                "est_minus_a_mean": round(float(np.mean(est[:, c] - a[:, c])), 4),
                                "est_minus_a_p90": round(float(np.quantile(est[:, c] - a[:, c], 0.9)), 4),
                                "a_minus_a_disjoint_mean":
                                    round(float(np.mean(a[:, c] - d["a_disjoint"][rows][:, c])), 4)}
                       for c, n in enumerate(GRID) if n in (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,second")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--reference", type=int, default=512)
    parser.add_argument("--demo-data", default=str(ROOT / "demo_data"))
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--slack-share", type=float, default=0.96)
    parser.add_argument("--chosen", default="step4,c/n", help="schedule,form of the rule to sweep and report")
    parser.add_argument("--simulate-only", action="store_true", help="use the cached arrays, measure nothing")
    parser.add_argument("--force", action="store_true", help="measure again even if cached")
    args = parser.parse_args()
    names = args.models.split(",")
    cached = dict(np.load(CACHE_FILE, allow_pickle=False)) if CACHE_FILE.exists() and not args.force else {}
    data, meta = {}, {}
    for name in names:
        fields = ("r", "a", "a_disjoint", "keys", "reference_pair", "seconds")
        if not all(f"{name}/{field}" in cached for field in fields) \
                or cached[f"{name}/r"].shape[0] != args.images:
            if args.simulate_only:
                sys.exit(f"no cached arrays for {name} with {args.images} images: run without --simulate-only")
            cached.update({f"{name}/{field}": value for field, value in
                           measure(name, args.images, args.reference, args.demo_data).items()})
            CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(CACHE_FILE, grid=np.array(GRID), **cached)
        data[name] = {field: cached[f"{name}/{field}"] for field in ("r", "a", "a_disjoint")}
        meta[name] = {"images": args.images, "measure_seconds": round(float(cached[f"{name}/seconds"]), 1),
                      "reference_vs_disjoint_reference_median":
                          round(float(np.median(cached[f"{name}/reference_pair"])), 4)}
    half = args.images // 2
    calibration, validation = slice(0, half), slice(half, args.images)
    sd = spread(data, calibration)
    rules = []
    for schedule, boundaries in SCHEDULES.items():
        for form in FORMS:
            constant = fit(data, calibration, boundaries, form, args.target, args.slack_share, sd)
            row = {"schedule": schedule, "boundaries": boundaries, "form": form, "constant": constant}
            if constant is not None:
                row["calibration"] = evaluate(data, calibration, boundaries, form, constant, args.target, sd)
                row["validation"] = evaluate(data, validation, boundaries, form, constant, args.target, sd)
            rules.append(row)
            if constant is None:
                print(f"{schedule:16s} {form:10s} no constant reaches {args.slack_share}", flush=True)
                continue
            cal, val = row["calibration"], row["validation"]
            cells = " | ".join(f"{name} cal {cal[name]['mean_samples']:5.1f} {cal[name]['share']:.3f} "
                               f"val {val[name]['mean_samples']:5.1f} {val[name]['share']:.3f} gain {val[name]['gain']}"
                               for name in names)
            print(f"{schedule:16s} {form:10s} c={constant:<7} {cells}", flush=True)
    schedule, form = args.chosen.split(",")
    chosen = dict(next(row for row in rules if row["schedule"] == schedule and row["form"] == form))
    for row in rules:  # the full detail is kept for the chosen rule only
        for part in ("calibration", "validation"):
            if part in row:
                row[part] = {name: {key: model[key] for key in ("mean_samples", "share", "gain")}
                             for name, model in row[part].items()}
    sweep_grid = {"c/n": np.arange(0, 0.41, 0.02), "c/sqrt(n)": np.arange(0, 0.101, 0.005),
                  "c": np.arange(0, 0.031, 0.0015), "z*sd": np.arange(0, 4.01, 0.2)}[form]
    chosen["sweep"] = [{"constant": round(float(c), 4),
                        **{part: {name: {k: v for k, v in model.items() if k in ("mean_samples", "share", "gain")}
                                  for name, model in evaluate(data, rows, SCHEDULES[schedule], form, float(c),
                                                              args.target, sd).items()}
                           for part, rows in (("calibration", calibration), ("validation", validation))}}
                       for c in sweep_grid]
    chosen["oracle"] = {part: oracle(data, rows, SCHEDULES[schedule], args.target)
                        for part, rows in (("calibration", calibration), ("validation", validation))}
    summary = {"grid": GRID, "chosen": chosen, "target": args.target, "slack_share": args.slack_share, "models": meta,
               "calibration_images": f"0..{half - 1}", "validation_images": f"{half}..{args.images - 1}",
               "sd_est_minus_agreement_calibration": {str(n): round(v, 4) for n, v in sd.items()},
               "per_n": {"calibration": per_n_table(data, calibration, args.target),
                         "validation": per_n_table(data, validation, args.target)},
               "rules": rules}
    text = json.dumps(summary, indent=1)
    # One line per short list or innermost object, so the file stays readable.
    text = re.sub(r"\[[^\[\]{}]*\]", lambda m: " ".join(m.group(0).split()), text)
    text = re.sub(r"\{[^\[\]{}]*\}", lambda m: " ".join(m.group(0).split()), text)
    SUMMARY_FILE.write_text(text + "\n")
    print(f"wrote {SUMMARY_FILE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
