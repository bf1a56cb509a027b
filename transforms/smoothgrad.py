"""``transforms.smoothgrad``: the engine's public names where callers have always imported them.

The engine lives in :mod:`transforms.engine`; ``from transforms.smoothgrad
import SmoothGrad`` is a public contract (notebooks, the Python API page), so
this re-exports :mod:`transforms.engine.smoothgrad`'s ``__all__``.
"""

from transforms.engine.smoothgrad import *  # noqa: F401,F403
from transforms.engine.smoothgrad import __all__  # noqa: F401
