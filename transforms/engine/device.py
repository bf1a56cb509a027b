"""Which kind of device computes the maps, and which CPU kernel library TensorFlow uses.

The last bits of a map depend on the hardware and the kernels that computed
it: TensorFlow's two CPU kernel libraries (oneDNN and Eigen) round
differently, XLA generates code for the CPU's vector extensions, and a GPU has
kernels of its own. So a run records the *kind* of device its maps came from
(:func:`device_kind`), and a baseline computed on another kind is not reused.

The kernel library is chosen with ``cpu_kernels`` (:data:`CPU_KERNELS`), by the
environment variable ``TF_ENABLE_ONEDNN_OPTS``, which TensorFlow reads once,
when it is imported: :func:`request_cpu_kernels` sets it, and must run before
``import tensorflow`` in every process that computes maps. This module imports
TensorFlow only inside :func:`cpu_kernels_in_effect` and :func:`device_kind`.

Example:

>>> request_cpu_kernels("onednn")      # before TensorFlow is imported
>>> device_kind()
'cpu x86_64 AMD EPYC [avx avx2 avx512_bf16 avx512_vnni avx512f fma] onednn'
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import sys

#: The values of ``cpu_kernels``: TensorFlow's oneDNN kernels, or its Eigen kernels.
CPU_KERNELS = ("onednn", "eigen")
#: Measured faster for the engine on x86 CPUs with and without AVX-512 (see the benchmarks).
DEFAULT_CPU_KERNELS = "onednn"
ENVIRONMENT_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
_VARIABLE_VALUE = {"onednn": "1", "eigen": "0"}

#: CPU features that change which kernels run or the code XLA generates (x86 and Arm names).
KERNEL_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")
#: Environment settings that cap the vector extensions the kernels use (they emulate an older CPU).
_ISA_CAPS = (("ONEDNN_MAX_CPU_ISA", "onednn_max_isa", re.compile(r"(.+)")),
             ("XLA_FLAGS", "xla_max_isa", re.compile(r"--xla_cpu_max_isa=(\S+)")))


def cpu_kernels_env(kernels: str) -> dict:
    """The environment entries that select ``kernels`` in a process started with them."""
    if kernels not in CPU_KERNELS:
        raise ValueError(f"'cpu_kernels' must be one of {set(CPU_KERNELS)}; got {kernels!r}.")
    return {ENVIRONMENT_VARIABLE: _VARIABLE_VALUE[kernels]}


def requested_in_environment() -> str | None:
    """The library that ``TF_ENABLE_ONEDNN_OPTS`` asks for in this process, or None when it is unset."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if value in ("1", "true"):
        return "onednn"
    if value in ("0", "false"):
        return "eigen"
    return None


def request_cpu_kernels(kernels: str) -> str | None:
    """Asks TensorFlow for ``kernels`` in this process and in the processes it starts.

    Sets ``TF_ENABLE_ONEDNN_OPTS``. It takes effect only if TensorFlow is not
    imported yet in this process.

    Returns:
        None when it will take effect; otherwise the library TensorFlow already
        uses here (the caller says so: it cannot be changed in a running process).
    """
    os.environ.update(cpu_kernels_env(kernels))
    if "tensorflow" not in sys.modules:
        return None
    in_effect = cpu_kernels_in_effect()
    return None if in_effect == kernels else in_effect


def requested_by_pipeline_options(environment=None) -> str | None:
    """The ``cpu_kernels`` of the pipeline this SDK worker runs, or None.

    A Beam SDK worker (Dataflow, a portable runner's worker pool) finds its
    pipeline's options as JSON in ``PIPELINE_OPTIONS`` (or the file named by
    ``PIPELINE_OPTIONS_FILE``) before it loads any of the pipeline's code, so
    the choice can be applied before TensorFlow is imported.
    """
    environment = os.environ if environment is None else environment
    text = environment.get("PIPELINE_OPTIONS")
    if "PIPELINE_OPTIONS_FILE" in environment:
        try:
            with open(environment["PIPELINE_OPTIONS_FILE"], encoding="utf-8") as handle:
                text = handle.read()
        except OSError:
            return None
    try:
        options = json.loads(text) if text else {}
    except ValueError:
        return None
    if not isinstance(options, dict):
        return None
    options = options.get("options", options)  # Dataflow's form, or the portable form keyed by URN
    for name in ("cpu_kernels", "beam:option:cpu_kernels:v1"):
        if options.get(name) in CPU_KERNELS:
            return options[name]
    return None


def apply_on_import() -> None:
    """What importing ``transforms`` does: choose the kernel library if TensorFlow is not imported yet.

    A pipeline's ``cpu_kernels`` (on an SDK worker) wins; otherwise an explicit
    ``TF_ENABLE_ONEDNN_OPTS`` is kept; otherwise :data:`DEFAULT_CPU_KERNELS`.
    """
    if "tensorflow" in sys.modules:
        return
    chosen = requested_by_pipeline_options()
    if chosen is not None:
        os.environ.update(cpu_kernels_env(chosen))
    elif requested_in_environment() is None:
        os.environ.update(cpu_kernels_env(DEFAULT_CPU_KERNELS))


def cpu_kernels_in_effect() -> str:
    """``onednn`` or ``eigen``: what the imported TensorFlow runs its CPU kernels with."""
    from tensorflow.python.util import _pywrap_util_port  # TensorFlow's own switch; no public API says it

    return "onednn" if _pywrap_util_port.IsMklEnabled() else "eigen"


@functools.lru_cache(maxsize=None)
def _cpu_description() -> str:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("model name", "Model", "cpu model") and not model:
                    model = " ".join(value.split())
                elif name in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the platform module's words are what there is
        model = platform.processor()
    present = sorted(flag for flag in KERNEL_FLAGS if flag in flags)
    caps = [f"{label}={match.group(1)}" for variable, label, pattern in _ISA_CAPS
            for match in [pattern.search(os.environ.get(variable, ""))] if match]
    features = "[" + " ".join(present + caps) + "]"
    return " ".join(part for part in ("cpu", platform.machine(), model or "unknown model", features) if part)


def current_device_kind() -> str:
    """:func:`device_kind` of the device an engine in this process computes on (a GPU when one is visible)."""
    import tensorflow as tf

    return device_kind("GPU" if tf.config.list_logical_devices("GPU") else "CPU")


def device_kind(device: str = "CPU", kernels: str | None = None) -> str:
    """The kind of device that computes maps: what decides their last bits.

    Args:
        device: ``CPU`` or ``GPU`` (the engine's compute device).
        kernels: for a CPU, the kernel library of the process that computes
            (default: :func:`cpu_kernels_in_effect` here).

    Returns:
        For a CPU: the machine, the CPU model, the vector extensions that
        decide its kernels (with any cap set on them) and the kernel library,
        e.g. ``cpu x86_64 AMD EPYC [avx avx2 fma] eigen``. For a GPU: ``gpu``
        and the first GPU's name and compute capability, as TensorFlow reports them.
    """
    if device.upper() == "GPU":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
        capability = details.get("compute_capability")
        return " ".join(part for part in (
            "gpu", str(details.get("device_name") or "unknown model"),
            f"cc{capability[0]}.{capability[1]}" if capability else "") if part)
    return f"{_cpu_description()} {kernels or cpu_kernels_in_effect()}"
