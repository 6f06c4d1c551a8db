"""The 3-D toy surface of Fig. 4, shared by its trainer (pipelines/toy3d.py) and the report, which must not
import a training module."""
from __future__ import annotations

import numpy as np


def surface(p):
    """z(x, y) = -sin(x^2) cos(3 y^2) exp(-(x y)^2) - exp(-(x + y)^2) at the points p[..., :2]: a torch tensor
    (differentiable) or a numpy array. Torch is imported only for tensors, so the report never loads it."""
    x, y = p[..., 0], p[..., 1]
    if isinstance(p, np.ndarray):
        lib = np
    else:
        import torch as lib
    return -lib.sin(x**2) * lib.cos(3 * y**2) * lib.exp(-((x * y) ** 2)) - lib.exp(-((x + y) ** 2))
