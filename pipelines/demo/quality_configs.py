"""The explanation settings compared by the quality study, run through the engine and summarised.

Every configuration is one :class:`transforms.smoothgrad.SmoothGrad` setting
(the engine API, not Beam) applied to preprocessed images: the plain gradient
(N=1, σ=0), SmoothGrad over an N × relative σ grid, a few smaller σ, absolute
σ=0.1 (the engine's default), SmoothGrad², VarGrad, the signed mean gradient
and Gradient×Input.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from pipelines.demo.quality_figures import MaskScorer
from transforms.engine.smoothgrad import SmoothGrad, SmoothGradResult

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Config:
    """One explanation setting.

    Attributes:
        name: the name shown in tables; ``"gradient"`` marks the baseline of the paired differences.
        variant: the engine's ``variant``.
        samples: N, noisy copies per image.
        noise: σ; 0 for the plain (un-noised) variants.
        noise_mode: ``relative`` (σ × the image's value range) or ``absolute``.
    """

    name: str
    variant: str = "smoothgrad"
    samples: int = 1
    noise: float = 0.0
    noise_mode: str = "relative"

    def label(self) -> str:
        """A short row title, e.g. ``SmoothGrad N=20 σ=0.1 rel``."""
        if self.noise == 0:
            return f"{self.name} (N=1, σ=0)"
        return f"{self.name} N={self.samples} σ={self.noise:g} {self.noise_mode[:3]}"


def main_configs(samples: list[int], sigmas: list[float], small_sigmas: list[float],
                 variant_samples: int, variant_sigmas: list[float]) -> list[Config]:
    """The settings compared on the demo model, without duplicates, in table order.

    Args:
        samples: the SmoothGrad N grid.
        sigmas: the relative σ grid (every N at every σ).
        small_sigmas: extra small relative σ, SmoothGrad at ``variant_samples`` only.
        variant_samples: N for SmoothGrad², VarGrad, the signed mean and Gradient×Input.
        variant_sigmas: relative σ for those variants.

    Returns:
        The gradient first, then SmoothGrad, absolute σ=0.1 at N=20, plain g²
        and Gradient×Input (their own baselines), and the noisy variants.
    """
    configs = [Config("gradient")]
    configs += [Config("SmoothGrad", samples=n, noise=s) for s in sigmas for n in samples]
    configs += [Config("SmoothGrad", samples=variant_samples, noise=s) for s in small_sigmas]
    configs.append(Config("SmoothGrad", samples=20, noise=0.1, noise_mode="absolute"))
    configs.append(Config("SmoothGrad²", variant="smoothgrad_squared"))  # plain g², SG²'s own baseline
    configs.append(Config("Gradient×Input", variant="grad_x_input"))
    for name, variant in (("signed mean", "signed"), ("SmoothGrad²", "smoothgrad_squared"),
                          ("VarGrad", "vargrad"), ("Gradient×Input", "grad_x_input")):
        configs += [Config(name, variant=variant, samples=variant_samples, noise=s) for s in variant_sigmas]
    unique = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    return unique


def control_configs(variant_samples: int, sigmas: list[float], variant_sigmas: list[float]) -> list[Config]:
    """The settings compared on the noise-tuned control model.

    The gradient, SmoothGrad at ``variant_samples`` for each of ``sigmas``, and
    the signed mean and VarGrad at ``variant_samples`` for each of ``variant_sigmas``.
    """
    configs = [Config("gradient")]
    configs += [Config("SmoothGrad", samples=variant_samples, noise=s) for s in sigmas]
    configs += [Config("signed mean", variant="signed", samples=variant_samples, noise=s) for s in variant_sigmas]
    configs += [Config("VarGrad", variant="vargrad", samples=variant_samples, noise=s) for s in variant_sigmas]
    return configs


def run_config(model, config: Config, images: np.ndarray, keys: list[str], batch_size: int, jit: str,
               seed: int) -> tuple[SmoothGradResult, float, SmoothGrad]:
    """Explains ``images`` (top-1 targets) with one setting; the timing leaves out the first trace.

    Returns:
        ``(result, seconds for all images, the explainer)``.
    """
    explainer = SmoothGrad(model, samples=config.samples, noise=config.noise, noise_mode=config.noise_mode,
                           variant=config.variant, batch_size=batch_size, jit=jit, seed=seed)
    explainer(images[:batch_size], keys[:batch_size])  # trace once, outside the timing
    started = time.perf_counter()
    result = explainer(images, keys)
    seconds = time.perf_counter() - started
    return result, seconds, explainer


def summarise(config: Config, figures: dict, scorer: MaskScorer, baseline: dict | None, seconds: float,
              count: int, sigma_abs: float) -> dict:
    """One table row: the setting, its timing and the mean and 95 % interval of every figure.

    Args:
        config: the setting.
        figures: :meth:`MaskScorer.figures` of its maps.
        scorer: the scorer of the images (bootstrap resamples and chance level).
        baseline: the gradient's figures on the same images, for paired
            differences; None for the gradient itself and before it has run.
        seconds: time to explain all images.
        count: number of images.
        sigma_abs: mean σ in input units.

    Returns:
        A JSON-ready dict.
    """
    row = {"config": config.label(), **dataclasses.asdict(config), "seconds": round(seconds, 3),
           "ms_per_image": round(1000 * seconds / count, 2), "sigma_abs_mean": round(sigma_abs, 4),
           "unscored": int(np.isnan(figures["mass"]).sum())}
    for key, values in figures.items():
        row[key] = scorer.interval(values)
    row["mass_over_chance"] = round(row["mass"]["mean"] / scorer.chance, 2)
    row["pointing_over_chance"] = round(row["pointing"]["mean"] / scorer.chance, 2)
    if baseline is not None:
        for key in ("mass", "pointing"):
            row[f"{key}_minus_gradient"] = scorer.interval(figures[key] - baseline[key])
        row["mass_beats_gradient_share"] = round(float(np.nanmean(figures["mass"] > baseline["mass"])), 3)
    return row


def evaluate(model, configs: list[Config], images: np.ndarray, keys: list[str], scorer: MaskScorer, *,
             batch_size: int, jit: str, seed: int, tag: str) -> tuple[list[dict], dict[Config, np.ndarray]]:
    """Runs and scores every setting on one model, logging a line per setting.

    Settings after the ``"gradient"`` one get paired differences against it.

    Args:
        model: the Keras model.
        configs: the settings, the gradient first.
        images: preprocessed images ``float32 [B, H, W, C]``.
        keys: one key per image (it seeds the noise).
        scorer: the :class:`MaskScorer` of the images.
        batch_size: the engine's batch size.
        jit: the engine's ``jit`` mode.
        seed: the engine's noise seed.
        tag: a prefix for the log lines (e.g. ``"demo"``).

    Returns:
        ``(rows, {config: maps})``.
    """
    rows, maps_by_config, baseline = [], {}, None
    for config in configs:
        result, seconds, explainer = run_config(model, config, images, keys, batch_size, jit, seed)
        figures = scorer.figures(result.maps)
        if config.name == "gradient":
            baseline = figures
        row = summarise(config, figures, scorer, baseline if config.name != "gradient" else None, seconds,
                        len(images), float(np.mean(result.noise_sigma)))
        row["jit_used"] = explainer.jit_used
        rows.append(row)
        maps_by_config[config] = result.maps
        logger.info("[%s] %-40s mass %.3f  pointing %.3f  %.1fs", tag, row["config"], row["mass"]["mean"],
                    row["pointing"]["mean"], seconds)
    return rows, maps_by_config
