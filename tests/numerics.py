"""Float comparisons for the harness tests, relative to the scale of the tensors compared.

Note: the stacks reorder float32 reductions (oneDNN, grappler, XLA, other thread counts), so two paths
that compute the same thing agree to a few ulps *of the tensor's magnitude*, not of each element: an
element near zero in a tensor of magnitude 40 can differ by 1e-4 absolute. Tolerances here are therefore
fractions of ``max(|expected|)``.
"""

from __future__ import annotations

import numpy as np


def assert_close_to_scale(actual, expected, rel: float, what: str = "tensor") -> None:
    """Every element of ``actual`` within ``rel * max(|expected|)`` of ``expected``."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} vs {e.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    scale = float(np.abs(e).max())
    worst = float(np.abs(a - e).max())
    assert worst <= rel * scale, (
        f"{what}: max difference {worst:.3g} is {worst / scale if scale else float('inf'):.3g} of the scale "
        f"{scale:.3g} (allowed {rel:g})"
    )
