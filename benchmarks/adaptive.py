"""Adaptive samples (``samples="auto"``) against fixed N, with the real engine, on two models.

For each model (``demo`` and the grating model of ``benchmarks/second_task.py``)
and its validation images (test images ``--images // 2`` to ``--images - 1``,
the half ``benchmarks/adaptive_calibration.py`` did not fit its rule on):

* the reference map of each image: the mean of ``--reference`` (512) samples;
* fixed N for every N of a fine grid (every even N from 4 to 64, then every 8
  to 128): the share of maps whose Spearman rank correlation with the
  reference reaches ``--target`` (0.95);
* adaptive: ``SmoothGrad(model, samples="auto", target_reliability=0.95,
  min_samples=8, max_samples=64, ...)``: its mean ``samples_used`` and share;
* the gain: the smallest fixed N of the grid reaching the adaptive share,
  divided by the adaptive mean samples per image;
* the check that an adaptive map **is** the fixed-N map with N = its
  ``samples_used`` (max abs difference over every image whose samples_used is
  on the grid, and ``--check-keys`` of them explained again alone).

Rows of the printed table: fixed N = 10, 20, 30, 50 and adaptive, with the
seconds of a warm call (the median of ``--repeats`` calls; the first call of
each explainer compiles and is not timed) and, for adaptive, the image-samples
computed per image counting the padding of each stage's last batch.
``--margins 0.16,0.26`` runs the adaptive row once per stopping margin C (the
rule stops an image after n samples when its estimate reaches
``target + C / n``; this sets ``transforms.engine.adaptive.MARGIN`` for the run); the
default is the engine's own margin. All explainers use ``noise=0.1``
(absolute), ``batch_size=16``, ``jit="graph"``. The JSON goes to ``--out``
(``benchmarks/adaptive.json``).

``--zoo`` adds the **leave-one-family-out** validation on the model zoo
(``benchmarks/model_zoo.py``; arrays measured by ``benchmarks/adaptive_zoo.py``
with the engine's own stages, fitted by ``benchmarks/adaptive_rules.py``):
per family left out, the margin C fitted on the other families, the held-out
family's mean samples, its share of maps within ``--target`` of a
``--zoo-reference`` (512) sample reference, the smallest fixed N of the stage
grid reaching that share and the ratio. ``--models ""`` runs the zoo part only;
``--zoo-engine`` also runs ``SmoothGrad(samples="auto")`` itself on each family
and compares its ``samples_used`` with the rule simulated at the engine's C.

Example (from the repository root; about 10-15 minutes on 2 CPU cores)::

    python benchmarks/second_task.py
    python benchmarks/adaptive.py --margins 0.16,0.26
    python benchmarks/adaptive.py --models "" --zoo all
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from adaptive_calibration import GRID, load_model_images  # noqa: E402

ROWS = (10, 20, 30, 50)


def agreements(maps, reference) -> np.ndarray:
    from transforms.engine.statistics import rank_correlation

    return np.array([rank_correlation(m, r) for m, r in zip(maps, reference)])


def timed(explainer, images, keys, repeats: int):
    """``(result, median seconds of repeats calls)``, after an untimed warm-up call on the first batch (it compiles)."""
    explainer(images[:explainer.batch_size], keys[:explainer.batch_size])
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = explainer(images, keys)
        seconds.append(time.perf_counter() - started)
    return result, float(np.median(seconds))


def padded_samples(used: np.ndarray, boundaries, batch_size: int) -> int:
    """Image-samples computed, padding included: each stage runs its unfinished images in padded batches."""
    total, previous = 0, 0
    for boundary in boundaries:
        running = int(np.sum(used >= boundary))
        total += -(-running // batch_size) * batch_size * (boundary - previous)
        previous = boundary
    return total


def run_model(name: str, args, margins: list[float]) -> dict:
    """Reference, adaptive runs (one per margin) and the fixed-N grid of one model; the check uses the first margin."""
    import transforms.engine.adaptive
    from transforms.engine.smoothgrad import SmoothGrad

    engine_margin = transforms.engine.adaptive.MARGIN

    model, images, keys = load_model_images(name, args.images, args.demo_data)
    images, keys = images[args.images // 2:], keys[args.images // 2:]
    common = dict(noise=0.1, batch_size=16, jit="graph")
    reference = SmoothGrad(model, samples=args.reference, reliability=False, **common)(images, keys).maps
    runs = {}  # margin -> (result, seconds, agrees)
    try:
        for margin in margins:
            transforms.engine.adaptive.MARGIN = margin
            result, elapsed = timed(SmoothGrad(
                model, samples="auto", target_reliability=args.target_reliability, min_samples=args.min_samples,
                max_samples=args.max_samples, **common), images, keys, args.repeats)
            runs[margin] = (result, elapsed, agreements(result.maps, reference) >= args.target)
    finally:
        transforms.engine.adaptive.MARGIN = engine_margin
    fixed_share, seconds = {}, {}
    difference, compared = dict.fromkeys(margins, 0.0), dict.fromkeys(margins, 0)
    for samples in sorted(set(GRID) | set(ROWS)):
        explainer = SmoothGrad(model, samples=samples, reliability=False, **common)
        if samples in ROWS:
            result, seconds[samples] = timed(explainer, images, keys, args.repeats)
        else:
            result = explainer(images, keys)
        fixed_share[samples] = float(np.mean(agreements(result.maps, reference) >= args.target))
        for margin, (adaptive, _, _) in runs.items():
            same = np.asarray(adaptive.samples_used) == samples
            if same.any():
                difference[margin] = max(difference[margin],
                                         float(np.abs(result.maps[same] - adaptive.maps[same]).max()))
                compared[margin] += int(same.sum())
        print(f"{name} fixed N={samples}: share {fixed_share[samples]:.3f}", flush=True)
    adaptive = runs[margins[0]][0]
    used = np.asarray(adaptive.samples_used)
    alone = []
    for index in np.unique(used, return_index=True)[1][:args.check_keys]:  # one image per distinct samples_used
        single = SmoothGrad(model, samples=int(used[index]), reliability=False, **common)(
            images[index:index + 1], keys[index:index + 1]).maps[0]
        alone.append({"key": keys[index], "samples_used": int(used[index]),
                      "max_abs_diff": float(np.abs(single - adaptive.maps[index]).max())})
    rows = {}
    for margin, (result, elapsed, ok) in runs.items():
        counts = np.asarray(result.samples_used)
        share = float(ok.mean())
        reaching = [n for n in sorted(fixed_share) if fixed_share[n] >= share - 1e-12]
        smallest = reaching[0] if reaching else None
        rows[str(margin)] = {
            "mean_samples": round(float(counts.mean()), 2), "share": round(share, 4),
            "samples_used": {"min": int(counts.min()), "median": int(np.median(counts)),
                             "p90": int(np.quantile(counts, 0.9, method="lower")), "max": int(counts.max())},
            "histogram": {str(n): int(c) for n, c in zip(*np.unique(counts, return_counts=True))},
            "seconds": round(elapsed, 2), "smallest_fixed_n_reaching_share": smallest,
            "padded_image_samples_per_image": round(padded_samples(
                counts, transforms.engine.adaptive.stage_boundaries(args.min_samples, args.max_samples), 16) / len(keys), 2),
            "gain": round(smallest / float(counts.mean()), 2) if smallest else None,
            "same_as_fixed_n": {"images_compared": compared[margin], "max_abs_diff": difference[margin]}}
    return {
        "images": len(keys), "keys": f"{keys[0]}..{keys[-1]}", "adaptive": rows,
        "fixed": {str(n): {"share": round(fixed_share[n], 4),
                           **({"seconds": round(seconds[n], 2)} if n in seconds else {})} for n in sorted(fixed_share)},
        "explained_alone": {"margin": margins[0], "maps": alone},
    }


def markdown(results: dict) -> str:
    lines = ["| model | row | mean samples / image | computed, with padding | share ≥ 0.95 "
             "| smallest fixed N reaching it | gain | seconds (warm) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        for n in ROWS:
            row = result["fixed"][str(n)]
            computed = -(-result["images"] // 16) * 16 * n / result["images"]
            lines.append(f"| {name} | fixed N={n} | {n} | {computed:.1f} | {row['share']:.3f} | | | "
                         f"{row['seconds']:.2f} |")
        for margin, a in result["adaptive"].items():
            lines.append(f"| {name} | adaptive, C = {margin} | {a['mean_samples']:.1f} | "
                         f"{a['padded_image_samples_per_image']:.1f} | {a['share']:.3f} | "
                         f"{a['smallest_fixed_n_reaching_share']} | {a['gain']} | {a['seconds']:.2f} |")
    return "\n".join(lines)


def zoo(args) -> None:
    """Prints (and writes to ``benchmarks/adaptive_zoo.json``) the leave-one-family-out tables."""
    import adaptive_rules
    import model_zoo

    families = list(model_zoo.FAMILIES) if args.zoo == "all" else args.zoo.split(",")
    data = adaptive_rules.prepare(families, args.zoo_images, args.zoo_reference)
    out = {"settings": {"images": args.zoo_images, "reference": args.zoo_reference, "target": args.target,
                        "fit_share": args.fit_share, "max_samples": adaptive_rules.MAX_SAMPLES}, "estimates": {}}
    for kind in ("all", "engine"):
        table, rows = adaptive_rules.leave_one_out_markdown(data, kind, args.target, args.fit_share)
        out["estimates"][kind] = rows
        print(f"\nestimate {kind!r}, left out in turn ({args.zoo_images} images per family, "
              f"{args.zoo_reference}-sample reference):\n{table}", flush=True)
    if args.zoo_engine:
        out["engine_runs"] = {family: engine_check(family, data[family], args) for family in families}
    Path(ROOT / "benchmarks" / "adaptive_zoo.json").write_text(json.dumps(out, indent=1) + "\n")


def engine_check(family: str, fam: dict, args) -> dict:
    """The real engine's auto run on a zoo family against the rule simulated on its stage maps (the engine's C)."""
    import adaptive_rules
    import model_zoo
    import transforms.engine.adaptive
    from transforms.engine.smoothgrad import SmoothGrad

    model, images, keys = model_zoo.load(family, args.zoo_images)
    result = SmoothGrad(model, samples="auto", noise=0.1, batch_size=16, jit="graph")(images, keys)
    used, ok = adaptive_rules.simulate(fam, "engine", transforms.engine.adaptive.MARGIN, args.target)
    row = {"mean_samples": round(float(result.samples_used.mean()), 2),
           "simulated_mean_samples": round(float(used.mean()), 2),
           "images_with_other_samples_used": int(np.sum(result.samples_used != used)),
           "simulated_share": round(float(ok.mean()), 4)}
    print(f"{family}: engine auto run {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,second")
    parser.add_argument("--images", type=int, default=192, help="test images; the second half is used")
    parser.add_argument("--reference", type=int, default=512)
    parser.add_argument("--target", type=float, default=0.95, help="agreement with the reference that counts")
    parser.add_argument("--target-reliability", type=float, default=0.95)
    parser.add_argument("--min-samples", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--margins", help="stopping margins C to run, comma-separated (default: the engine's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (the median is kept)")
    parser.add_argument("--check-keys", type=int, default=4)
    parser.add_argument("--demo-data", default=str(ROOT / "demo_data"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "adaptive.json"))
    parser.add_argument("--zoo", help="leave-one-family-out on these zoo families (comma-separated, or all)")
    parser.add_argument("--zoo-images", type=int, default=64)
    parser.add_argument("--zoo-reference", type=int, default=512)
    parser.add_argument("--fit-share", type=float, default=0.96, help="share each fitting family must reach")
    parser.add_argument("--zoo-engine", action="store_true",
                        help="also run the real engine (samples=auto) on each zoo family and compare")
    args = parser.parse_args()
    import transforms.engine.adaptive

    if args.zoo:
        zoo(args)
    if not args.models:
        return

    margins = [float(value) for value in args.margins.split(",")] if args.margins else [transforms.engine.adaptive.MARGIN]
    results = {name: run_model(name, args, margins) for name in args.models.split(",")}
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "demo_data", "margins")}
    settings.update(margins=margins, engine_margin=transforms.engine.adaptive.MARGIN)
    Path(args.out).write_text(json.dumps({"settings": settings, "results": results}, indent=1) + "\n")
    print(markdown(results))
    for name, result in results.items():
        for margin, row in result["adaptive"].items():
            check = row["same_as_fixed_n"]
            print(f"{name}, C = {margin}: adaptive map vs fixed N = samples_used: max abs diff "
                  f"{check['max_abs_diff']:.3g} over {check['images_compared']} images")
        alone = result["explained_alone"]["maps"]
        print(f"{name}: explained alone at N = samples_used: max abs diff {max(c['max_abs_diff'] for c in alone):.3g} "
              f"({len(alone)} keys)")


if __name__ == "__main__":
    main()
