"""Pipelines of smoothgrad-audit: the graph built from a validated config."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) hides the
# pipeline's own messages; a user can still set the variable to 0.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
