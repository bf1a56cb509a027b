"""The steps of smoothgrad-audit and its SmoothGrad engine.

Importing this package chooses TensorFlow's CPU kernel library when
TensorFlow is not imported yet (:func:`transforms.engine.device.apply_on_import`):
the pipeline's ``cpu_kernels`` on a Beam worker, else an explicit
``TF_ENABLE_ONEDNN_OPTS``, else oneDNN, measured faster for the engine.
"""

from transforms.engine.device import apply_on_import

apply_on_import()
