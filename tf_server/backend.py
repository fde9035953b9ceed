"""TFBackend: serves a SavedModel's ``serving_default`` signature on CPU or GPU.

The signature is called flat: its inference function's ``call_flat`` with the input
tensors in the graph's own order, the outputs taken back by name from the graph's
output order. The structured call (``signature(**inputs)``) binds and flattens its
keyword arguments in Python on every call, which cost more than the mlp's own graph
(mlp, batch 1: 267 µs through the structured call on numpy inputs, 141 µs flat).
``call_flat`` is not part of TensorFlow's public API, so the flat call is checked
against the structured one on the model's example inputs at load, and the structured
call is used instead (logged) if the flat one is missing or differs.

Precision and compilation (``--precision``, ``--compile``):

- bf16 and fp16 serve their own SavedModel (``tf_server.model.save``: variables and
  computation in that dtype, casts at the edges), written once beside the artifact as
  ``derived/tensorflow-<version>/<precision>/``; fp32 and tf32 serve the artifact itself
  (tf32 turns on TensorFloat-32 execution, process-wide).
- ``--compile on`` calls the signature inside a ``tf.function(jit_compile=True)``: XLA
  compiles the whole graph once per input shape. Sequence inputs are therefore padded
  (with the model's pad values) up to a power of two, at least 8 and at most the model's
  longest sequence, and outputs cut back, so warm-up can compile every shape the batcher
  can produce: each batch size times each sequence bucket (``warm_up_inputs``). A shape
  met for the first time while serving is compiled then, and logged as a warning.
- On a GPU every op should run there: the model loads with soft device placement off, so an
  op placed elsewhere is an error, not a silent CPU fallback. If that load fails because an op
  has no GPU kernel (some ops have none in bf16/fp16), it loads again with soft placement on
  (such ops run on the CPU, with copies around them), says so in a warning and reports it
  in ModelConfig (``soft_placement``: ``on: <TensorFlow's reason>``, else ``off``), so its cost shows
  in every measurement of that server; the GPU check reports it per run. Soft placement is
  process-wide in TensorFlow: it stays on for the process once a model needed it.
  Where the variables and outputs live is logged once at load, and checked (strictly
  placed: all on the GPU). Inputs reach the GPU
  as one host-to-device copy per input (TensorFlow stages them through its own pinned
  buffers) and outputs come back once each (``.numpy()``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from contract.datatypes import DATATYPES, TensorSpec, bf16_to_float32
from contract.signature import ModelSignature
from modelzoo.base import ModelDefinition
from serving.artifacts import ArtifactError, ArtifactSignature
from serving.backend import DEFAULT_OPTIONS, TOLERANCES, Backend, BackendOptions
from tf_server.model import input_signature, save, sequence_limit

log = logging.getLogger(__name__)

Call = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def tf_device_name(device: str) -> str:
    """TF's name for a resolved device: ``"cpu"`` -> ``"/CPU:0"``, ``"cuda:N"`` -> ``"/GPU:K"``, K
    the position of physical GPU N among the GPUs visible to TensorFlow (0 once
    ``TensorFlowFramework.configure`` has narrowed visibility to it)."""
    if device == "cpu":
        return "/CPU:0"
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index.isdigit():
        raise ValueError(f"not a resolved device: {device!r} (expected cpu or cuda:N)")
    physical = tf.config.list_physical_devices("GPU")
    if int(index) >= len(physical):
        return f"/GPU:{index}"  # TensorFlow sees no such GPU: placing there fails, naming it
    visible = [gpu.name for gpu in tf.config.get_visible_devices("GPU")]
    name = physical[int(index)].name
    if name not in visible:
        raise ValueError(f"{device}: TensorFlow was configured for another GPU (visible: {visible})")
    return f"/GPU:{visible.index(name)}"


def structured_call(signature: Any) -> Call:
    """The signature's public call: keyword tensors in, a dict of tensors out."""

    def call(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: tensor.numpy() for name, tensor in signature(**inputs).items()}

    return call


def flat_input_names(signature: Any) -> list[str]:
    """The names of a signature's inputs in the order its graph takes them: its keyword arguments,
    flattened as TensorFlow flattens them (the graph's placeholder names where those are missing)."""
    _, kwargs = signature.structured_input_signature
    names = tf.nest.flatten({name: name for name in kwargs})
    captured = len(signature.captured_inputs)
    if len(names) == len(signature.inputs) - captured:
        return list(names)
    return [tensor.name.partition(":")[0] for tensor in signature.inputs[: len(signature.inputs) - captured]]


def flat_call(signature: Any) -> Call:
    """The signature's graph called with flat tensors (see the module docstring)."""
    function = signature._inference_function
    captured = tuple(signature.captured_inputs)
    input_names: Sequence[str] = flat_input_names(signature)
    output_names: Sequence[str] = tf.nest.flatten({name: name for name in signature.structured_outputs})
    constant = tf.constant

    def call(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = function.call_flat(*[constant(inputs[name]) for name in input_names], *captured)
        return {name: tensor.numpy() for name, tensor in zip(output_names, outputs, strict=True)}

    return call


#: Where derived artifacts live inside a version directory.
DERIVED = "derived"
#: The shortest sequence bucket under XLA.
MIN_SEQUENCE_BUCKET = 8


def sequence_buckets(longest: int) -> list[int]:
    """Powers of two from ``MIN_SEQUENCE_BUCKET`` up to ``longest``, and ``longest`` itself."""
    buckets, size = [], MIN_SEQUENCE_BUCKET
    while size < longest:
        buckets.append(size)
        size *= 2
    return [*buckets, longest]


def _sequence_axes(specs: Sequence[TensorSpec]) -> list[tuple[str, list[int]]]:
    """(name, variable axes beyond the batch axis) of each spec that has any."""
    found = [(spec.name, [axis for axis, dim in enumerate(spec.shape) if axis and dim == -1]) for spec in specs]
    return [(name, axes) for name, axes in found if axes]


#: File of a SavedModel's graph and signatures, inside its directory.
SAVED_MODEL_FILE = "saved_model.pb"
#: TensorFlow's bfloat16 as numpy (ml_dtypes): the dtype BF16 words are viewed as on the way in.
BF16 = tf.bfloat16.as_numpy_dtype


def tf_datatype(dtype: tf.DType) -> str | None:
    """The protocol datatype of a TensorFlow dtype (None: none carries it)."""
    if dtype == tf.bfloat16:
        return "BF16"
    if dtype == tf.string:
        return "BYTES"
    try:
        return DATATYPES.get(np.dtype(dtype.as_numpy_dtype))
    except TypeError:
        return None


def saved_model_signature(directory: Path) -> ArtifactSignature:
    """The ``serving_default`` signature of a SavedModel, read from its ``saved_model.pb`` alone
    (no variables restored): inputs and outputs by key, in key order (TensorFlow's own)."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    path = Path(directory) / SAVED_MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {SAVED_MODEL_FILE} (a SavedModel directory)")
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(path.read_bytes())
    except (DecodeError, OSError) as err:
        raise ArtifactError(f"{path}: not a readable SavedModel ({err})") from None
    found = [meta.signature_def for meta in saved.meta_graphs]
    signature = next((defs["serving_default"] for defs in found if "serving_default" in defs), None)
    if signature is None:
        names = sorted({name for defs in found for name in defs})
        raise ArtifactError(f"{path}: no serving_default signature (it has {names})")

    def spec(name: str, info: Any, role: str) -> TensorSpec:
        dtype = tf.dtypes.as_dtype(info.dtype)
        datatype = tf_datatype(dtype)
        if datatype is None:
            raise ArtifactError(f"{path}: {role} {name!r} has dtype {dtype.name}, which the protocol cannot carry")
        if info.tensor_shape.unknown_rank:
            raise ArtifactError(f"{path}: {role} {name!r} has no known rank; give its signature a shape")
        return TensorSpec(name, datatype, tuple(int(dim.size) for dim in info.tensor_shape.dim))

    inputs = tuple(spec(name, signature.inputs[name], "input") for name in sorted(signature.inputs))
    outputs = tuple(spec(name, signature.outputs[name], "output") for name in sorted(signature.outputs))
    return ArtifactSignature(inputs, outputs)


#: Characters TensorFlow's checkpoint reader takes as a file pattern: it globs the variables' path.
_GLOB_CHARACTERS = frozenset("*?[]\\")


def load_saved_model(directory: Path) -> Any:
    """``tf.saved_model.load`` of ``directory``, also when its path holds glob characters (a
    repository under ``models/tf[bf16]``), which would make TF look for files that match a
    pattern instead: then it loads through a symlink of a plain name (the variables are read
    during the load; nothing refers to the link afterwards)."""
    if not _GLOB_CHARACTERS.intersection(str(directory)):
        return tf.saved_model.load(str(directory))
    with tempfile.TemporaryDirectory(prefix="tf-load-") as plain:
        link = Path(plain) / "saved_model"
        link.symlink_to(Path(directory).resolve(), target_is_directory=True)
        return tf.saved_model.load(str(link))


#: What TensorFlow's errors say when an op cannot be placed on the device asked for.
_PLACEMENT_ERRORS = ("Could not satisfy", "no supported kernel", "Cannot assign a device", "No registered")


class TFBackend(Backend):
    """One SavedModel; the version directory is the SavedModel directory (TF Serving layout)."""

    platform = "tensorflow_savedmodel"

    def __init__(
        self,
        model: ModelSignature,
        artifact_dir: Path,
        options: BackendOptions = DEFAULT_OPTIONS,
    ) -> None:
        super().__init__(model, artifact_dir, options)
        self._tf_device = tf_device_name(self.device)
        # BF16 travels as raw uint16 words: viewed as bfloat16 in, and back out.
        self._bf16_inputs = {spec.name for spec in model.inputs if spec.datatype == "BF16"}
        self._bf16_outputs = {spec.name for spec in model.outputs if spec.datatype == "BF16"}
        self._on_cpu = self.device == "cpu"
        self._saved_model: Any = None
        self._signature: Any = None
        self._call: Call | None = None
        self._input_dtypes = {spec.name: spec.numpy_dtype for spec in model.inputs}
        #: Sequence buckets under XLA (empty: the model has no sequence dimension, or compile is off).
        limit = sequence_limit(model)
        self._ragged = _sequence_axes(model.inputs)
        self._ragged_outputs = _sequence_axes(model.outputs)
        self.buckets = sequence_buckets(limit) if self.compile == "on" and limit is not None and self._ragged else []
        #: Input shapes XLA has compiled for (compile on), in the order first met.
        self.shapes: list[tuple[tuple[int, ...], ...]] = []

    def saved_model_dir(self) -> Path:
        """The SavedModel this precision serves, exported first if it is not there yet."""
        if self.precision in ("fp32", "tf32"):
            return self.artifact_dir
        directory = self.artifact_dir / DERIVED / f"tensorflow-{tf.__version__}" / self.precision
        if not (directory / SAVED_MODEL_FILE).is_file():
            if not isinstance(self.model, ModelDefinition):
                raise ValueError(f"--precision {self.precision}: {self.name} is served as exported (fp32 or tf32)")
            started = time.perf_counter()
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{self.precision}-", dir=directory.parent))
            try:
                save(self.model, str(staging), self.precision)
                shutil.rmtree(directory, ignore_errors=True)
                staging.rename(directory)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self.timings["export_s"] = time.perf_counter() - started
            log.info("%s: exported the %s SavedModel to %s in %.1f s", self.name, self.precision, directory,
                     self.timings["export_s"])  # fmt: skip
        return directory

    def load(self) -> None:
        tf.config.experimental.enable_tensor_float_32_execution(self.precision == "tf32")
        if self._on_cpu:
            self._load()
            return
        tf.config.set_soft_device_placement(False)
        try:
            self._load()
            self.reported["soft_placement"] = "off"
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as err:
            reason = " ".join(str(err.message).split())
            if not any(sign in reason for sign in _PLACEMENT_ERRORS):
                raise
            log.warning("%s: an op cannot run on %s (%s); loading again with soft device placement: such ops run "
                        "on the CPU (ModelConfig reports soft_placement)", self.name, self._tf_device,
                        reason[:500])  # fmt: skip
            tf.config.set_soft_device_placement(True)
            self._load()
            self.reported["soft_placement"] = f"on: {reason[:300]}"

    def _load(self) -> None:
        with tf.device(self._tf_device):
            self._saved_model = load_saved_model(self.saved_model_dir())
        self._signature = self._saved_model.signatures["serving_default"]
        structured = structured_call(self._signature)
        try:
            self._call = flat_call(self._signature)
            self._check(structured, strict=True)
        except Exception as err:
            log.warning("%s: flat call unavailable (%s); using the structured call", self.name, err)
            self._call = structured
        if self.compile == "on":
            started = time.perf_counter()
            self._call = flat_call(self._xla_function())
            self._check(structured, strict=False)
            self.timings["compile_s"] = time.perf_counter() - started
        self._log_placement()

    def _xla_function(self) -> Any:
        """The signature inside a ``tf.function(jit_compile=True)``, as a concrete function."""
        signature = self._signature
        names = [spec.name for spec in self.model.inputs]

        @tf.function(jit_compile=True, input_signature=input_signature(self.model))
        def compiled(*inputs: tf.Tensor) -> Any:
            return signature(**dict(zip(names, inputs, strict=True)))

        with tf.device(self._tf_device):
            return compiled.get_concrete_function()

    def _check(self, structured: Call, strict: bool) -> None:
        """Raise if this backend's outputs differ from the structured call's on example inputs:
        beyond 1e-5 when ``strict`` (the same graph), else beyond the precision's tolerance."""
        tolerance = TOLERANCES[self.precision]
        rng = np.random.default_rng(0)
        for rows in (1, 3):
            inputs = self.model.complete_inputs(self.model.example_inputs(rows, rng))
            expected, actual = self._run(structured, self._feed(inputs)), self.predict(inputs)
            if expected.keys() != actual.keys():
                raise ValueError(f"outputs {sorted(actual)} are not {sorted(expected)}")
            for name in self._bf16_outputs:  # compared as values, not as raw words
                expected[name], actual[name] = bf16_to_float32(expected[name]), bf16_to_float32(actual[name])
            for name, wanted in expected.items():
                if strict and not np.allclose(actual[name], wanted, rtol=1e-5, atol=1e-6):
                    raise ValueError("outputs differ from the structured call")
                if not strict and not tolerance.holds(actual[name], wanted):
                    error, relative = tolerance.errors(actual[name], wanted)
                    raise RuntimeError(
                        f"{self.name}: the XLA-compiled signature differs from the SavedModel on {name!r} (max abs "
                        f"{error:.3g}, {relative:.3g} of the largest value) beyond the {self.precision} tolerance"
                    )

    def _log_placement(self) -> None:
        """Say once where the weights live and where the graph computes (soft placement is off,
        so an op without a kernel on this device fails instead of moving to the CPU)."""
        variables = {variable.device for variable in self._signature.variables}
        rng = np.random.default_rng(0)
        inputs = self._feed(self.model.complete_inputs(self.model.example_inputs(1, rng)))
        with tf.device(self._tf_device):
            outputs = self._signature(**{name: tf.constant(array) for name, array in inputs.items()})
        computed = {tensor.device for tensor in outputs.values()}
        log.info("%s: placement: variables on %s, outputs computed on %s", self.name, ", ".join(sorted(variables)),
                 ", ".join(sorted(computed)))  # fmt: skip
        wanted = self._tf_device.lstrip("/").upper()
        strict = self._on_cpu or not tf.config.get_soft_device_placement()
        if strict and not all(device.upper().endswith(wanted) for device in variables | computed):
            raise RuntimeError(f"{self.name}: placed outside {self._tf_device}: {sorted(variables | computed)}")

    def _feed(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: np.asarray(inputs[name], dtype=dtype) for name, dtype in self._input_dtypes.items()}
        for name in self._bf16_inputs:
            feed[name] = feed[name].view(BF16)
        return feed

    def _run(self, call: Call, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._on_cpu:
            outputs = call(feed)
        else:
            with tf.device(self._tf_device):
                outputs = call(feed)
        for name in self._bf16_outputs:
            outputs[name] = outputs[name].view(np.uint16)
        return outputs

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._call is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        feed = self._feed(inputs)
        if self.compile != "on":
            return self._run(self._call, feed)
        sizes = self._pad_sequences(feed)
        shape = tuple(array.shape for array in feed.values())
        if shape not in self.shapes:
            self.shapes.append(shape)
            log.log(logging.WARNING if self.warmed_up else logging.DEBUG, "%s: XLA compiles for input shapes %s",
                    self.name, shape)  # fmt: skip
        outputs = self._run(self._call, feed)
        if not sizes:
            return outputs
        for name, axes in self._ragged_outputs:
            cut = [slice(None)] * outputs[name].ndim
            for k, axis in enumerate(axes):
                cut[axis] = slice(None, sizes[k])
            outputs[name] = outputs[name][tuple(cut)]
        return outputs

    def _pad_sequences(self, feed: dict[str, np.ndarray]) -> list[int]:
        """Pad the sequence axes of ``feed`` (in place) up to their buckets; returns the sizes
        they had (of the first sequence input, as the batcher cuts outputs by them)."""
        if not self.buckets:
            return []
        sizes: list[int] = []
        for name, axes in self._ragged:
            array = feed[name]
            if not sizes:
                sizes = [array.shape[axis] for axis in axes]
            widths = [(0, 0)] * array.ndim
            for axis in axes:
                size = array.shape[axis]
                widths[axis] = (0, next((bucket for bucket in self.buckets if bucket >= size), size) - size)
            if any(after for _, after in widths):
                feed[name] = np.pad(array, widths, constant_values=self.model.pad_values.get(name, 0))
        return sizes

    def warm_up_inputs(self, batch_size: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        """Under XLA with sequences: one example per sequence bucket, so each is compiled."""
        if not self.buckets:
            return super().warm_up_inputs(batch_size, rng)
        return [
            self.model.complete_inputs(self.model.example_inputs(batch_size, rng, seq_len=bucket))
            for bucket in self.buckets
        ]

    def close(self) -> None:
        self._call = None
        self._signature = None
        self._saved_model = None
