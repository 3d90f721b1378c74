"""Host-side integer helpers for grids and tile sizes.

Plain Python on purpose: recent Triton releases make ``triton.cdiv`` / ``triton.next_power_of_2`` constexpr
functions whose host calls unwrap every argument (a few microseconds each), and a wrapper makes a dozen such
calls per launch pair.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
