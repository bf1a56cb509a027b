"""The package layout's promises: public import paths that outlive moves."""

from __future__ import annotations

import transforms.engine.smoothgrad as engine


def test_transforms_smoothgrad_still_exports_the_engine_names():
    import transforms.smoothgrad as public

    assert public.SmoothGrad is engine.SmoothGrad
    assert set(public.__all__) == set(engine.__all__)
    for name in engine.__all__:
        assert getattr(public, name) is getattr(engine, name), name
