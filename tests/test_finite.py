"""all_finite agrees with torch.isfinite(t).all() for every float dtype, including sums that overflow."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptools.finite import all_finite

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(DTYPES), n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1),
       special=st.sampled_from([None, float("nan"), float("inf"), float("-inf"), "max", "inf-pair"]))
def test_all_finite_is_isfinite_all(dtype: torch.dtype, n: int, seed: int, special: object) -> None:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g).to(dtype)
    if n and special is not None:
        index = int(torch.randint(n, (1,), generator=g))
        if special == "max":  # finite values whose float32 sum overflows: the exact test must decide
            t[:] = torch.finfo(dtype).max
        elif special == "inf-pair":  # Inf − Inf = NaN in the sum
            t[index], t[(index + 1) % n] = float("inf"), float("-inf")
        else:
            t[index] = special
    assert all_finite(t) == bool(torch.isfinite(t).all())


def test_non_float_tensors_are_finite() -> None:
    assert all_finite(torch.arange(5)) and all_finite(torch.zeros(3, dtype=torch.bool))
