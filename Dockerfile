# Worker container for smoothgrad-audit on Dataflow (Runner v2), which also
# serves as the Flex Template launcher image. Build and push: docs/running-at-scale.md.
#
#   docker build -t IMAGE .                  # workers and Flex Template launcher (default)
#   docker build --target worker -t IMAGE .  # workers only
#
# The versions below must satisfy setup.py (tests/test_container.py checks it):
# the Beam SDK image of the pinned apache-beam version, for Python 3.11, and
# TensorFlow with its CUDA libraries. The NVIDIA driver comes from the Dataflow
# VM (worker_accelerator=...;install-nvidia-driver), not from this image.

# Google's Flex Template base image, only for its launcher binary. Pin a dated
# tag of it for reproducible builds.
ARG TEMPLATE_LAUNCHER_IMAGE=gcr.io/dataflow-templates-base/python311-template-launcher-base:latest
FROM ${TEMPLATE_LAUNCHER_IMAGE} AS template-launcher

FROM apache/beam_python3.11_sdk:2.77.0 AS worker

# TensorFlow with CUDA (cuDNN, cuBLAS, ... as pip wheels): its own layer, rebuilt rarely.
RUN pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0"

# The project and its remaining dependencies (apache-beam is the image's own).
WORKDIR /opt/smoothgrad-audit
COPY setup.py README.md ./
COPY pipelines ./pipelines
COPY transforms ./transforms
RUN pip install --no-cache-dir ".[gcp]"

# TensorFlow's CPU kernel library: oneDNN, measured faster for the engine on x86 CPUs with and without
# AVX-512 (TensorFlow itself enables it only on CPUs with AVX-512 VNNI/BF16 or AMX). A job's cpu_kernels
# option replaces this when the worker imports the project, before TensorFlow.
ENV TF_ENABLE_ONEDNN_OPTS=1

# Dataflow starts the SDK harness through Beam's boot program: keep it as the entrypoint.
ENTRYPOINT ["/opt/apache/beam/boot"]

FROM worker AS flex-template

# The Flex Template launcher runs python /template/launch.py with the template's parameters.
COPY templates/flex/launch.py /template/launch.py
COPY --from=template-launcher /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/launch.py
