"""Fits and validates stopping rules of ``samples: auto`` on the model zoo, leaving one family out at a time.

Numpy only, on the arrays of ``benchmarks/adaptive_zoo.py`` (each stage's map,
its even/odd half-maps and a reference map per image and family). For each
**estimate** of a map's rank agreement with its converged map (below) it
reports the bias against the true agreement a_n = Spearman(map_n, reference)
and, per family left out, the rule ``estimate >= target + C / n`` (stages 8
to 64, as ``samples: auto`` runs by default) with C the smallest constant (on
a grid) for which, in every *other* family, at least ``--fit-share`` (0.96)
of the maps it stops before 64 samples are within ``--target`` (0.95) of
their reference (maps that reach 64 are flagged as not converged by their
``samples_used``). For the held-out family: mean samples, the share of all
its maps within 0.95, the share stopped early and how many of those are
within 0.95, the smallest fixed N of the stage grid (8 to 128) reaching the
same share, and the ratio (mean samples / that N).

Estimates (all ``sqrt(2 r / (1 + r))`` of a split-half rank correlation r):

* ``all``: r over every pixel, ties at their average rank (the engine before
  this study: pixels no sample reached are zero in both halves, tie in the
  same places and look like perfect agreement);
* ``nonzero``: r over the pixels non-zero in either half;
* ``tiebreak_both``: r with ties broken in a fixed pseudo-random order,
  another one for each half (a zero block agrees with nothing);
* ``tiebreak_one``: ties of the odd half broken that way, the even half's
  kept at their average rank (the zero block of the n-sample map against
  distinct reference values, as the true agreement sees it);
* ``engine``: what the engine's stopping rule reads
  (:func:`transforms.engine.statistics.stopping_correlation`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

ESTIMATES = ("all", "nonzero", "tiebreak_both", "tiebreak_one", "engine")
CONSTANTS = np.round(np.arange(0.0, 2.0001, 0.01), 4)
MAX_SAMPLES = 64


def _ranks(values: np.ndarray, order_key: np.ndarray | None) -> np.ndarray:
    from transforms.engine.statistics import average_ranks

    if order_key is None:
        return average_ranks(values)
    ranks = np.empty(values.size)
    ranks[np.lexsort((order_key, values))] = np.arange(values.size)
    return ranks


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def split_half(even: np.ndarray, odd: np.ndarray, kind: str) -> float:
    """The split-half r of one pair of half-maps under estimate ``kind``."""
    from transforms.engine.statistics import tie_order

    from transforms.engine.statistics import stopping_correlation

    a, b = even.ravel().astype(np.float64), odd.ravel().astype(np.float64)
    if kind == "engine":
        return stopping_correlation(a, b)
    if kind == "all":
        return _corr(_ranks(a, None), _ranks(b, None))
    if kind == "nonzero":
        keep = (a != 0) | (b != 0)
        return _corr(_ranks(a[keep], None), _ranks(b[keep], None))
    first, second = tie_order(a.size, 0), tie_order(a.size, 1)
    if kind == "tiebreak_both":
        return _corr(_ranks(a, first), _ranks(b, second))
    if kind == "tiebreak_one":
        return _corr(_ranks(a, None), _ranks(b, second))
    raise ValueError(f"unknown estimate {kind!r}")


def to_estimate(r) -> np.ndarray:
    r = np.clip(np.nan_to_num(np.asarray(r, np.float64), nan=0.0), 0.0, 1.0)
    return np.sqrt(2 * r / (1 + r))


def prepare(families, images: int, reference: int) -> dict:
    """Per family: ``stages``, true agreement ``a`` and every estimate ``[images, stages]``, zero shares."""
    import adaptive_zoo
    from transforms.engine.statistics import rank_correlation

    out = {}
    for family in families:
        d = adaptive_zoo.load(family, images, reference)
        count, stages = d["maps"].shape[:2]
        a = np.array([[rank_correlation(d["maps"][i, s], d["reference"][i]) for s in range(stages)]
                      for i in range(count)])
        estimates = {kind: to_estimate([[split_half(d["even"][i, s], d["odd"][i, s], kind) for s in range(stages)]
                                        for i in range(count)]) for kind in ESTIMATES}
        both_zero = np.mean((d["even"] == 0) & (d["odd"] == 0), axis=(2, 3))
        out[family] = {"stages": d["stages"], "a": a, "estimates": estimates, "both_zero": both_zero,
                       "reference_zero": float(np.mean(d["reference"] == 0))}
        print(f"prepared {family}", flush=True)
    return out


def simulate(fam: dict, kind: str, constant: float, target: float, max_samples: int = MAX_SAMPLES):
    """``(samples used, agrees)`` per image for the rule on stages up to ``max_samples``."""
    stages = fam["stages"]
    columns = np.flatnonzero(stages <= max_samples)
    n = stages[columns].astype(np.float64)
    passes = fam["estimates"][kind][:, columns] >= np.minimum(target + constant / n, 0.9999)[None, :]
    passes[:, -1] = True
    stop = columns[np.argmax(passes, axis=1)]
    return stages[stop], fam["a"][np.arange(len(stop)), stop] >= target


def smallest_fixed(fam: dict, share: float, target: float):
    for column, n in enumerate(fam["stages"]):
        if np.mean(fam["a"][:, column] >= target) >= share - 1e-9:
            return int(n)
    return None


def precision(used: np.ndarray, ok: np.ndarray, max_samples: int = MAX_SAMPLES) -> float:
    """The share of the maps stopped before ``max_samples`` that agree at the target (NaN when none stopped)."""
    early = used < max_samples
    return float(ok[early].mean()) if early.any() else float("nan")


def fit(data: dict, names, kind: str, target: float, fit_share: float):
    """The smallest C for which, in every family of ``names``, the maps the rule stops early agree at ``fit_share``.

    Maps that reach ``max_samples`` are not counted: there the rule has said
    "not converged" (``samples_used`` = ``max_samples``), which is right for
    a family whose maps do not converge by then (``gmp``).
    """
    for constant in CONSTANTS:
        if all(not precision(*simulate(data[name], kind, constant, target)) < fit_share for name in names):
            return float(constant)
    return None


def held_out(data: dict, kind: str, target: float, fit_share: float) -> dict:
    rows = {}
    for family in data:
        constant = fit(data, [name for name in data if name != family], kind, target, fit_share)
        if constant is None:
            rows[family] = {"constant": None}
            continue
        used, ok = simulate(data[family], kind, constant, target)
        share = float(ok.mean())
        fixed = smallest_fixed(data[family], share, target)
        rows[family] = {"constant": constant, "mean_samples": round(float(used.mean()), 2),
                        "share": round(share, 4), "stopped_early": round(float(np.mean(used < MAX_SAMPLES)), 4),
                        "share_of_stopped_early": None if not (used < MAX_SAMPLES).any() else round(precision(used, ok), 4), "smallest_fixed_n": fixed,
                        "ratio": round(float(used.mean()) / fixed, 2) if fixed else None}
    return rows


def bias(data: dict, kind: str, n: int) -> dict:
    out = {}
    for family, fam in data.items():
        column = int(np.flatnonzero(fam["stages"] == n)[0])
        error = fam["estimates"][kind][:, column] - fam["a"][:, column]
        out[family] = {"mean": round(float(error.mean()), 4), "p90": round(float(np.quantile(error, 0.9)), 4)}
    return out


def leave_one_out_markdown(data: dict, kind: str, target: float, fit_share: float) -> tuple[str, dict]:
    """The leave-one-family-out table of estimate ``kind`` (markdown) and its rows."""
    rows = held_out(data, kind, target, fit_share)
    lines = [f"| left out | C fitted without it | mean samples | share >= {target} | stopped before {MAX_SAMPLES} "
             f"| of those, share >= {target} | smallest fixed N with that share | mean samples / that N |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for family, row in rows.items():
        lines.append(f"| {family} | {row['constant']} | {row.get('mean_samples')} | {row.get('share')} | "
                     f"{row.get('stopped_early')} | {row.get('share_of_stopped_early')} | "
                     f"{row.get('smallest_fixed_n')} | {row.get('ratio')} |")
    return "\n".join(lines), rows


def main() -> None:
    import model_zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(model_zoo.FAMILIES))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--reference", type=int, default=512)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--fit-share", type=float, default=0.96)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "adaptive_rules.json"))
    args = parser.parse_args()
    data = prepare(args.families.split(","), args.images, args.reference)
    summary = {"settings": vars(args), "families": {}, "estimates": {}}
    for family, fam in data.items():
        summary["families"][family] = {
            "reference_zero_share": round(fam["reference_zero"], 4),
            "both_halves_zero_share": {str(n): round(float(fam["both_zero"][:, c].mean()), 4)
                                       for c, n in enumerate(fam["stages"]) if n in (8, 16, 32, 64)},
            "fixed_share": {str(n): round(float(np.mean(fam["a"][:, c] >= args.target)), 4)
                            for c, n in enumerate(fam["stages"])}}
        print(family, json.dumps(summary["families"][family]), flush=True)
    for kind in ESTIMATES:
        all_constant = fit(data, list(data), kind, args.target, args.fit_share)
        summary["estimates"][kind] = {"bias_n8": bias(data, kind, 8), "bias_n32": bias(data, kind, 32),
                                      "constant_all_families": all_constant,
                                      "held_out": held_out(data, kind, args.target, args.fit_share)}
        print(f"\n{kind}: C fitted on all families = {all_constant}")
        print(leave_one_out_markdown(data, kind, args.target, args.fit_share)[0])
        print("bias (estimate - agreement) n=8 / n=32, mean and p90: " + "; ".join(
            f"{family} {b['mean']:+.3f}/{b['p90']:+.3f}, {summary['estimates'][kind]['bias_n32'][family]['mean']:+.3f}/"
            f"{summary['estimates'][kind]['bias_n32'][family]['p90']:+.3f}"
            for family, b in summary["estimates"][kind]["bias_n8"].items()), flush=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
