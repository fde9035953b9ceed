"""Codecs between Open Inference Protocol tensors and numpy arrays.

Two layers, table-driven: raw bytes (``raw_*_contents``: little-endian, row-major;
BYTES elements as a 4-byte little-endian length then the bytes) and typed
``InferTensorContents`` fields. Used by the servers (decode requests, encode
replies: always raw) and by the client (the reverse).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from contract.datatypes import NUMPY_DTYPES, datatype_of
from contract.errors import InvalidInput
from contract.protocol import inference_pb2 as pb

# OIP datatype -> the InferTensorContents field that carries it when typed.
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidInput(f"shape {list(shape)} has a negative dimension")
        count *= dim
    return count


def _check_datatype(datatype: str) -> np.dtype:
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        raise InvalidInput(f"unknown datatype {datatype!r}") from None


# ---- raw bytes ----


def raw_to_array(raw: bytes, datatype: str, shape: Sequence[int], name: str = "tensor") -> np.ndarray:
    """Decode raw contents; the byte length must match shape and datatype exactly."""
    dtype = _check_datatype(datatype)
    count = element_count(shape)
    if datatype == "BYTES":
        return _unpack_bytes(raw, count, name).reshape(shape)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input {name!r}: {len(raw)} bytes of raw contents, expected {expected} for {datatype} {list(shape)}"
        )
    # frombuffer is zero-copy and read-only; backends must not write into inputs.
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def array_to_raw(array: np.ndarray, datatype: str | None = None) -> bytes:
    """Encode an array as raw contents (BYTES: length-prefixed elements)."""
    datatype = datatype or datatype_of(array)
    if datatype == "BYTES":
        return _pack_bytes(array)
    dtype = NUMPY_DTYPES[datatype]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _pack_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in np.asarray(array, dtype=object).ravel():
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _unpack_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    out = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES raw contents end before element {index} of {count}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES element {index} runs past the end of its raw contents")
        out[index] = raw[offset : offset + length]
        offset += length
    if offset != len(raw):
        raise InvalidInput(f"input {name!r}: {len(raw) - offset} bytes left over after {count} BYTES elements")
    return out


# ---- typed contents ----


def contents_to_array(
    contents: pb.InferTensorContents, datatype: str, shape: Sequence[int], name: str = "tensor"
) -> np.ndarray:
    """Decode typed contents; the element count must match the shape."""
    dtype = _check_datatype(datatype)
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: datatype {datatype} can only be sent as raw contents")
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: {len(values)} values in {field}, expected {count} for shape {list(shape)}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    source = np.fromiter(values, dtype=_WIDE[field], count=count)
    if datatype != "BOOL" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if count and (source.min() < info.min or source.max() > info.max):
            raise InvalidInput(f"input {name!r}: values out of range for {datatype}")
    return source.astype(dtype, copy=False).reshape(shape)


_WIDE: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int64),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint64),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


def array_to_contents(array: np.ndarray, datatype: str, contents: pb.InferTensorContents) -> None:
    """Fill typed contents from an array (FP16/BF16 have no typed field: use raw)."""
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise TypeError(f"datatype {datatype} has no typed contents field; send it raw")
    target = getattr(contents, field)
    if datatype == "BYTES":
        target.extend(item.encode() if isinstance(item, str) else bytes(item) for item in np.ravel(array))
    else:
        target.extend(np.ravel(array).tolist())


# ---- whole requests and responses ----


def request_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Decode every input of a request (raw or typed), checking each one's encoding.

    Validation against the model's TensorSpecs is the caller's job (see validation).
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per input, in order"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidInput(f"input {tensor.name!r} appears twice")
        shape = list(tensor.shape)
        if raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidInput(f"input {tensor.name!r} has both raw and typed contents")
            arrays[tensor.name] = raw_to_array(raw[index], tensor.datatype, shape, tensor.name)
        else:
            arrays[tensor.name] = contents_to_array(tensor.contents, tensor.datatype, shape, tensor.name)
    return arrays


def build_request(
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Iterable[str] | None = None,
    *,
    model_version: str = "",
    request_id: str = "",
    raw: bool = True,
    datatypes: Mapping[str, str] | None = None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest from numpy inputs (raw contents by default)."""
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = (datatypes or {}).get(name) or datatype_of(array)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            request.raw_input_contents.append(array_to_raw(array, datatype))
        else:
            array_to_contents(array, datatype, tensor.contents)
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def build_response(
    request: pb.ModelInferRequest,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    datatypes: Mapping[str, str],
) -> pb.ModelInferResponse:
    """The reply to ``request``: ``outputs`` in order, always as raw contents."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=model_version, id=request.id)
    for name, array in outputs.items():
        datatype = datatypes[name]
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(array_to_raw(array, datatype))
    return response


def response_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decode every output of a reply (raw contents, or typed from other servers)."""
    raw = response.raw_output_contents
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if raw:
            arrays[tensor.name] = raw_to_array(raw[index], tensor.datatype, shape, tensor.name)
        else:
            arrays[tensor.name] = contents_to_array(tensor.contents, tensor.datatype, shape, tensor.name)
    return arrays
