"""Open Inference Protocol datatypes, their numpy equivalents, and TensorSpec.

Pure numpy: imported by the servers, the client, the model zoo and the load tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# OIP datatype -> numpy dtype (little-endian, as on the wire). BYTES is an object
# array of Python bytes. BF16 has no numpy type: it travels as raw uint16 words.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
    "BYTES": np.dtype(np.object_),
}

# numpy dtype -> OIP datatype (the inverse table; BF16 is never inferred).
DATATYPES: dict[np.dtype, str] = {dt: name for name, dt in NUMPY_DTYPES.items() if name != "BF16"}

# Triton model_config DataType enum values (same numbers as in inference.proto).
CONFIG_DATATYPES: dict[str, int] = {
    "BOOL": 1,
    "UINT8": 2,
    "UINT16": 3,
    "UINT32": 4,
    "UINT64": 5,
    "INT8": 6,
    "INT16": 7,
    "INT32": 8,
    "INT64": 9,
    "FP16": 10,
    "FP32": 11,
    "FP64": 12,
    "BYTES": 13,
    "BF16": 14,
}


def bf16_to_float32(words: np.ndarray) -> np.ndarray:
    """BF16 values (their raw uint16 words) as float32, exactly: a BF16 is a float32's top half."""
    return (np.asarray(words, dtype="<u2").astype("<u4") << 16).view("<f4")


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values as BF16 raw words, rounded to nearest (ties to even)."""
    bits = np.asarray(values, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array; bytes/str object arrays are BYTES."""
    dtype = array.dtype
    if dtype.kind in "SUO":
        return "BYTES"
    try:
        return DATATYPES[dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype]
    except KeyError:
        raise TypeError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, OIP datatype and full shape.

    ``shape`` includes the batch dimension first when the model batches; -1 marks a
    variable dimension. ``optional`` inputs may be omitted by the client (the model
    definition then supplies a default). ``value_range`` bounds integer inputs.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False
    #: Inclusive bounds on integer values (e.g. token ids below the vocabulary size).
    value_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.datatype not in NUMPY_DTYPES:
            raise ValueError(f"unknown datatype {self.datatype!r}")

    @property
    def numpy_dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.datatype]

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        """True when a concrete shape fits this spec (-1 matches any size >= 0)."""
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )
