"""Random tensors of a protocol datatype: the one builder the client CLI and the load tests share.

Pure numpy. Values: FP16/FP32/FP64 standard normal; integers uniform in ``int_range``
(``[low, high)``, clipped to the dtype); BOOL a fair coin; BF16 the raw uint16 words of
standard normal floats (BF16 has no numpy type); BYTES ``bytes_length`` random bytes per
element, in an object array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.datatypes import NUMPY_DTYPES


def random_array(
    datatype: str,
    shape: Sequence[int],
    rng: np.random.Generator,
    *,
    int_range: tuple[int, int] = (0, 100),
    bytes_length: int = 8,
) -> np.ndarray:
    """Random values of ``datatype`` in ``shape`` (see the module docstring for the distributions)."""
    shape = tuple(shape)
    if datatype not in NUMPY_DTYPES:
        raise ValueError(f"unknown datatype {datatype!r}")
    if datatype == "BYTES":
        return np.array([rng.bytes(bytes_length) for _ in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if datatype == "BF16":
        return (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(np.bool_)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    low, high = max(int_range[0], int(info.min)), min(int_range[1], int(info.max) + 1)
    if low >= high:
        raise ValueError(f"int_range {int_range} holds no {datatype} value")
    return rng.integers(low, high, size=shape).astype(dtype)
