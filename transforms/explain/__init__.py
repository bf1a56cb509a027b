"""Explain: the engine inside Beam (``SmoothGrad`` through RunInference, the stages of ``samples: auto``, sanity checks)."""
