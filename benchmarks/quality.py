"""Explanation quality of SmoothGrad and its variants on the demo's held-out split.

Every demo image's class is decided by one object whose pixel mask is stored
with the image (``python -m pipelines.demo``), so a saliency map can be scored
by the two figures the pipeline stores in its corpus columns
(``transforms.rows.postprocess.mask_figures``):

* **mass in mask**: the share of the map's |mass| that falls on the object;
* **pointing**: whether the map's largest |value| lies on the object.

The chance level of both is the object's area share (a map spread evenly, or a
peak dropped at random, scores it). Means come with 95 % bootstrap intervals
over images; "Δ vs gradient" is the paired difference with the plain gradient
on the same images.

Configurations (the engine API, not Beam, on preprocessed ``x/127.5-1`` images):
the plain gradient (N=1, σ=0), SmoothGrad over an N × relative σ grid, a few
smaller σ, absolute σ=0.1 (the engine's default and the demo config), and
SmoothGrad², VarGrad, the signed mean gradient (the paper's SmoothGrad:
|mean g| rather than mean |g|) and Gradient×Input at N=20.

Diagnostics, to explain how mass in mask changes with σ:

* per σ, over ``--diag-copies`` noisy copies per image (the engine's own noise,
  rebuilt from its stateless generator and checked against it): how often the
  copy's top-1 is still the clean target, which class the copies collapse to,
  where the global-max-pooling units that carry the target score sit (on the
  object or not), and the single noisy gradient's mass in mask, split by whether
  the copy still shows the target;
* mass in the object dilated by 1, 2 and 4 pixels and in rings around it (does
  smoothing only blur mass over the edge, or does mass move to the background?);
* a control: a copy of the demo model fine-tuned for a few epochs with Gaussian
  input noise (in memory, never saved), explained with the same settings. If
  the loss of mass with σ comes from the model not recognising noisy copies,
  it should disappear on this model.

``--examples PNG`` saves a grid of maps (image, mask, gradient, SmoothGrad at a
few σ, VarGrad, the control model) for a look by eye.

Make the demo folder first (a few minutes, offline)::

    python -m pipelines.demo --out demo_data
    python benchmarks/quality.py --data demo_data --out quality.json \\
        --markdown quality.md --examples benchmarks/quality_examples.png

The whole run takes about 5-10 minutes on 2 CPU cores. The study itself lives
in ``pipelines/quality_*.py``; this file is its command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipelines.demo import demo
from pipelines.demo.quality_report import markdown
from pipelines.demo.quality_study import StudySettings, run_study
from transforms.engine.smoothgrad import JIT_MODES


def _floats(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, e.g. ``"0.05,0.1"``."""
    return tuple(float(part) for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    """Comma-separated whole numbers, e.g. ``"10,20,50"``."""
    return tuple(int(part) for part in text.split(",") if part.strip())


def _parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="demo_data",
                        help="demo folder (make it with `python -m pipelines.demo --out demo_data`)")
    parser.add_argument("--split", default="test", help="held-out split to score")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images (None: the whole split)")
    parser.add_argument("--samples", default="10,20,50", help="SmoothGrad N grid")
    parser.add_argument("--sigmas", default="0.05,0.1,0.15,0.2,0.3", help="relative σ grid")
    parser.add_argument("--small-sigmas", default="0.01,0.02",
                        help="extra small relative σ, SmoothGrad at --variant-samples only")
    parser.add_argument("--variant-samples", type=int, default=20, help="N for SmoothGrad², VarGrad, signed, G×I")
    parser.add_argument("--variant-sigmas", default="0.05,0.1,0.15", help="relative σ for the variants")
    parser.add_argument("--diag-copies", type=int, default=20, help="noisy copies per image for the diagnostics")
    parser.add_argument("--seed", type=int, default=0, help="noise, bootstrap and fine-tuning seed")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--jit", default="graph", choices=JIT_MODES,
                        help="engine jit mode (XLA was ~5x slower than graph for this small CNN on CPU)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--control-epochs", type=int, default=4,
                        help="epochs of noise fine-tuning for the control model (0: skip the control)")
    parser.add_argument("--control-noise", type=float, default=0.45,
                        help="largest absolute input-noise σ used in the control's fine-tuning")
    parser.add_argument("--examples", default=None, help="save a PNG grid of example maps here")
    parser.add_argument("--out", default=None, help="write the full report as JSON here")
    parser.add_argument("--markdown", default=None, help="write the tables as Markdown here")
    return parser


def main(argv=None) -> dict:
    """Runs the study with the command line's options, prints the tables and writes the outputs.

    Returns:
        The report (see :func:`pipelines.demo.quality_study.run_study`).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.data, demo.MODEL_FILENAME)):
        parser.error(f"no {demo.MODEL_FILENAME} in {args.data!r}; make the demo folder with "
                     f"`python -m pipelines.demo --out {args.data}`.")
    # The study reports its progress on its loggers; print those lines as they come.
    progress = logging.StreamHandler(sys.stdout)
    progress.setFormatter(logging.Formatter("%(message)s"))
    study_logger = logging.getLogger("pipelines")
    study_logger.addHandler(progress)
    study_logger.setLevel(logging.INFO)
    study_logger.propagate = False

    settings = StudySettings(
        data=args.data, split=args.split, limit=args.limit, samples=_ints(args.samples), sigmas=_floats(args.sigmas),
        small_sigmas=_floats(args.small_sigmas), variant_samples=args.variant_samples,
        variant_sigmas=_floats(args.variant_sigmas), diag_copies=args.diag_copies, seed=args.seed,
        batch_size=args.batch_size, jit=args.jit, bootstrap=args.bootstrap, control_epochs=args.control_epochs,
        control_noise=args.control_noise, examples=args.examples)
    report = run_study(settings, command="python benchmarks/quality.py " + " ".join(
        sys.argv[1:] if argv is None else argv), recorded_settings=vars(args))
    text = markdown(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
