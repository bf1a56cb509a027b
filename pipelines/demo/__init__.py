"""The ground-truth demo (dataset and model, ``python -m pipelines.demo``) and the quality study built on it."""
