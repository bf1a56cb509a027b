"""The audit's inputs, made by the pipeline: class saliency aggregates and per-class samples of pooled maps."""
