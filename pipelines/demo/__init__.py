"""The ground-truth demo (dataset and model with a planted shortcut, ``python -m pipelines.demo``), the
planted-shortcut datasets with their clean twins (``python -m pipelines.demo.planted``) and the quality study."""
