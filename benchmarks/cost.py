"""The cost table of docs/running-at-scale.md: worker-hours per million images at N = 20, measured on CPU, estimated on GPUs.

CPU rows are engine throughputs measured on this project's 2-vCPU machine
(benchmarks/RESULTS.md; float32, jit graph). GPU rows are **estimates**, not
measurements (no GPU here): images/s = vendor peak dense FLOP/s × an assumed
utilisation / (forward FLOPs × 3 × N), the same "forward × 3 per noisy sample"
yardstick as benchmarks/engine.py. Prints the Markdown table::

    python benchmarks/cost.py [--utilisation 0.35] [--samples 20]
"""

from __future__ import annotations

import argparse

#: Forward GFLOP per image at batch 1 (tf.compat.v1.profiler float_operation on the frozen graph;
#: ResNet50 and Xception at 224x224: RESULTS.md "Engine throughput"; demo: "Running at scale").
FORWARD_GFLOP = {"demo (64x64)": 0.0322, "ResNet50 (224x224)": 7.76, "Xception (224x224)": 9.14,
                 "Xception (299x299)": 9.14 * (299 / 224) ** 2}

#: Engine images/s at N = 20, float32, on the 2-vCPU Intel Xeon of RESULTS.md "Performance (issue 9)":
#: demo from "Reduced precision" (batch 4), ResNet50 and Xception from "Peers side by side", run 2 (batch 4).
#: Xception at 299x299 is scaled from 224x224 by the FLOP ratio (an estimate).
CPU_IMAGES_PER_S = {"demo (64x64)": 71.61, "ResNet50 (224x224)": 0.694, "Xception (224x224)": 0.571,
                    "Xception (299x299)": 0.571 / (299 / 224) ** 2}

#: Vendor peak dense throughput in TFLOP/s (NVIDIA data sheets; without structured sparsity):
#: float32 = what TensorFlow's float32 runs on (TF32 tensor cores on Ampere and later, which TensorFlow
#: enables by default; FP32 on the T4), reduced = bfloat16 tensor cores (float16 on the T4, which has no bfloat16).
GPUS = {
    "T4": {"float32": 8.1, "reduced": 65.0, "reduced_name": "float16", "float32_name": "FP32 cores"},
    "L4": {"float32": 60.0, "reduced": 121.0, "reduced_name": "bfloat16", "float32_name": "TF32 cores"},
    "A100": {"float32": 156.0, "reduced": 312.0, "reduced_name": "bfloat16", "float32_name": "TF32 cores"},
    "H100 SXM": {"float32": 494.0, "reduced": 989.0, "reduced_name": "bfloat16", "float32_name": "TF32 cores"},
}


def hours_per_million(images_per_second: float) -> float:
    """Worker-hours to explain one million images at ``images_per_second``."""
    return 1e6 / images_per_second / 3600.0


def gpu_images_per_second(tflops: float, forward_gflop: float, samples: int, utilisation: float) -> float:
    """Estimated images/s: peak FLOP/s × utilisation / (forward FLOPs × 3 × samples)."""
    return tflops * 1e12 * utilisation / (forward_gflop * 1e9 * 3 * samples)


def _figure(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _cell(images_per_second: float, mark: str = "") -> str:
    return f"{_figure(images_per_second)}{mark} ({_figure(hours_per_million(images_per_second))} h)"


def table(samples: int = 20, utilisation: float = 0.35) -> str:
    """The Markdown table: a row per hardware and precision, a column per model.

    Each cell: images/s (worker-hours per million images). The demo model's GPU
    cells are marked †: a model that small is bound by per-step overhead and
    decoding, not by FLOPs, so they are far above what a GPU would reach.
    """
    models = list(FORWARD_GFLOP)
    lines = ["| hardware (precision) | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models),
             "| GFLOP per image (forward × 3 × N) | "
             + " | ".join(_figure(FORWARD_GFLOP[model] * 3 * samples) for model in models) + " |",
             "| CPU, 2 vCPUs, **measured** (float32) | "
             + " | ".join(_cell(CPU_IMAGES_PER_S[model], "" if "299" not in model else " ‡") for model in models)
             + " |"]
    for gpu, figures in GPUS.items():
        for kind in ("float32", "reduced"):
            name = figures[f"{kind}_name"]
            precision = "float32 on " + name if kind == "float32" else name
            cells = [_cell(gpu_images_per_second(figures[kind], FORWARD_GFLOP[model], samples, utilisation),
                           " †" if model.startswith("demo") else "") for model in models]
            lines.append(f"| {gpu} ({precision}, {figures[kind]:g} TFLOP/s peak), estimate | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--utilisation", type=float, default=0.35, help="assumed share of the GPU's peak")
    args = parser.parse_args(argv)
    print(table(args.samples, args.utilisation))


if __name__ == "__main__":
    main()
