"""Codec round trips for every datatype, raw and typed, and malformed contents."""

from __future__ import annotations

import numpy as np
import pytest

from contract import codec
from contract.datatypes import NUMPY_DTYPES, TensorSpec, datatype_of
from contract.errors import InvalidInput
from contract.protocol import inference_pb2 as pb


def _sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    rng = np.random.default_rng(1)
    if datatype == "BYTES":
        return np.array([b"a", b"", b"xyz\x00", "é".encode(), b"1234", b"z"], dtype=object).reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        values.flat[0], values.flat[-1] = info.min, info.max
        return values
    return rng.standard_normal(shape).astype(dtype)


ALL = sorted(NUMPY_DTYPES)
TYPED = sorted(codec.CONTENTS_FIELDS)


@pytest.mark.parametrize("datatype", ALL)
def test_raw_round_trip(datatype: str) -> None:
    array = _sample(datatype)
    raw = codec.array_to_raw(array, datatype)
    back = codec.raw_to_array(raw, datatype, array.shape)
    assert back.shape == array.shape
    assert back.dtype == NUMPY_DTYPES[datatype]
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("datatype", TYPED)
def test_typed_round_trip(datatype: str) -> None:
    array = _sample(datatype)
    contents = pb.InferTensorContents()
    codec.array_to_contents(array, datatype, contents)
    contents = pb.InferTensorContents.FromString(contents.SerializeToString())
    back = codec.contents_to_array(contents, datatype, array.shape)
    assert back.dtype == NUMPY_DTYPES[datatype]
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("raw", [True, False])
def test_request_round_trip(raw: bool) -> None:
    inputs = {"a": _sample("FP32"), "b": _sample("INT64"), "c": _sample("BYTES"), "d": _sample("BOOL")}
    request = pb.ModelInferRequest.FromString(codec.build_request("m", inputs, ["y"], raw=raw).SerializeToString())
    assert [t.name for t in request.inputs] == ["a", "b", "c", "d"]
    assert [o.name for o in request.outputs] == ["y"]
    assert bool(request.raw_input_contents) == raw
    decoded = codec.request_inputs(request)
    for name, array in inputs.items():
        np.testing.assert_array_equal(decoded[name], array)


def test_response_is_raw_and_ordered() -> None:
    request = pb.ModelInferRequest(model_name="m", id="r1")
    outputs: dict[str, np.ndarray] = {"z": np.ones((1, 2), np.float32), "a": np.arange(3, dtype=np.int64)[None]}
    response = codec.build_response(request, "1", outputs, {"z": "FP32", "a": "INT64"})
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "r1")
    assert [o.name for o in response.outputs] == ["z", "a"]
    assert len(response.raw_output_contents) == 2
    decoded = codec.response_outputs(response)
    np.testing.assert_array_equal(decoded["a"], outputs["a"])


def test_fp16_and_bf16_have_no_typed_field() -> None:
    with pytest.raises(TypeError):
        codec.array_to_contents(np.zeros(2, np.float16), "FP16", pb.InferTensorContents())
    with pytest.raises(InvalidInput, match="raw"):
        codec.contents_to_array(pb.InferTensorContents(), "BF16", [0])


@pytest.mark.parametrize(
    ("raw", "datatype", "shape", "message"),
    [
        (b"\x00" * 7, "FP32", [2], "7 bytes"),
        (b"\x00" * 8, "FP32", [3], "expected 12"),
        # Too long as well as too short: a byte more, and a whole element more (which would reshape).
        (b"\x00" * 9, "FP32", [2], "9 bytes"),
        (b"\x00" * 12, "FP32", [2], "12 bytes of raw contents, expected 8"),
        (b"\x00" * 4, "FP99", [1], "unknown datatype"),
        (b"\x00" * 4, "FP32", [-1], "negative"),
        (b"\x05\x00\x00\x00ab", "BYTES", [1], "runs past"),
        (b"\x01\x00\x00\x00ab", "BYTES", [1], "left over"),
        (b"\x01\x00", "BYTES", [1], "end before"),
    ],
)
def test_malformed_raw_contents(raw: bytes, datatype: str, shape: list[int], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        codec.raw_to_array(raw, datatype, shape)


def test_typed_count_and_range_checked() -> None:
    contents = pb.InferTensorContents(int_contents=[1, 2, 3])
    with pytest.raises(InvalidInput, match="3 values"):
        codec.contents_to_array(contents, "INT32", [2])
    with pytest.raises(InvalidInput, match="out of range"):
        codec.contents_to_array(pb.InferTensorContents(int_contents=[300]), "INT8", [1])


def test_request_raw_count_must_match_inputs() -> None:
    request = codec.build_request("m", {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)})
    del request.raw_input_contents[1]
    with pytest.raises(InvalidInput, match="1 raw_input_contents for 2 inputs"):
        codec.request_inputs(request)


def test_duplicate_input_rejected() -> None:
    request = codec.build_request("m", {"a": np.zeros(2, np.float32)})
    request.inputs.add(name="a", datatype="FP32", shape=[2])
    request.raw_input_contents.append(b"\x00" * 8)
    with pytest.raises(InvalidInput, match="twice"):
        codec.request_inputs(request)


def test_datatype_of_and_spec() -> None:
    assert datatype_of(np.zeros(1, ">f4")) == "FP32"
    assert datatype_of(np.array(["x"])) == "BYTES"
    with pytest.raises(TypeError):
        datatype_of(np.zeros(1, np.complex64))
    spec = TensorSpec("x", "FP32", (-1, 4))
    assert spec.accepts_shape((7, 4))
    assert not spec.accepts_shape((7, 5))
    assert not spec.accepts_shape((7, 4, 1))
    with pytest.raises(ValueError, match="unknown datatype"):
        TensorSpec("x", "FLOAT", (1,))
