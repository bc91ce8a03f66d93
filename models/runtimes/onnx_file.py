"""An ONNX model (a PyTorch, MONAI or Keras export) run by onnxruntime; its opset, input and
output names, shapes and types are read from the file and checked against the manifest."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx.checker import MAXIMUM_PROTOBUF, ValidationError
from onnx.external_data_helper import load_external_data_for_model, uses_external_data
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from models.manifest import Manifest, ManifestError
from models.runtimes.base import ForwardError, Outputs, Tensor, check_input, check_output, pick

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}
# What onnxruntime raises for a file it cannot load or an input it cannot run.
ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph,
              ort_state.InvalidProtobuf, ort_state.NoSuchFile, ort_state.NoModel,
              ort_state.NotImplemented, ort_state.RuntimeException, ort_state.EPFail)


def opset_of(proto: onnx.ModelProto) -> int:
    """The model's version of the default (ai.onnx) operator set."""
    return next((item.version for item in proto.opset_import if item.domain in ("", "ai.onnx")),
                0)


def _parse(path: Path) -> onnx.ModelProto:
    """The file's graph (weights kept beside it left there), or one line saying why not."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as error:
        raise ManifestError(path, "weights_file", f"not an ONNX model: {error}") from error


def read_proto(path: Path) -> onnx.ModelProto:
    """The model's graph without weights kept beside it, or one line saying why not; a model
    with external weights is refused (the manifest's sha256 would not cover them)."""
    proto = _parse(path)
    if _keeps_weights_beside(proto):
        raise ManifestError(path, "weights_file", "the model keeps weights in external files, "
                            "which its sha256 does not cover: save it as one .onnx file "
                            "(`pacs-ai models import` does)")
    return proto


def _keeps_weights_beside(proto: onnx.ModelProto) -> bool:
    """Whether the graph's weights lie in files beside it (PyTorch's exporter writes
    `NAME.onnx.data` by default)."""
    return any(uses_external_data(t) for t in proto.graph.initializer)


def write_whole(source: Path, target: Path) -> bool:
    """The model written to `target` as one file, so one sha256 covers it: its own bytes, or
    (True) its graph with the weights it keeps in files beside it taken inside."""
    proto = _parse(source)
    if not _keeps_weights_beside(proto):
        shutil.copyfile(source, target)
        return False
    try:
        load_external_data_for_model(proto, str(source.parent))
    except (OSError, ValueError, ValidationError) as error:
        raise ManifestError(source, "weights_file", "the weights it keeps beside it cannot be "
                            f"read: {error}") from error
    if proto.ByteSize() > MAXIMUM_PROTOBUF:
        raise ManifestError(source, "weights_file", "with its weights inside it would pass the "
                            "2 GB one ONNX file can hold; pacs-ai runs one file")
    onnx.save_model(proto, str(target))
    return True


def providers(device: str) -> list[str]:
    """CUDA first where asked for and this onnxruntime has it; the CPU always."""
    if device == "gpu" and CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    if device == "gpu":
        log.warning("models.device is gpu but this onnxruntime has no CUDA provider: CPU")
    return [CPU]


def open_session(path: Path, device: str = "cpu") -> ort.InferenceSession:
    """An onnxruntime session over the file, or one line saying why onnxruntime refuses it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning: a worker shares its CPUs with the receiver
    # (and on a busy box spinning threads cost a third of the throughput, measured).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=providers(device))
    except ORT_ERRORS as error:
        raise ManifestError(path, "weights_file",
                            f"onnxruntime cannot load it: {error}") from error


def tensor_of(arg: ort.NodeArg) -> Tensor:
    """An onnxruntime input or output as a `Tensor` (symbolic dimensions are dynamic)."""
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return Tensor(arg.name, shape, DTYPES.get(arg.type, arg.type))


class OnnxRuntime:
    """One onnxruntime session per model, shared by the worker's threads."""

    format = "onnx"

    def __init__(self, manifest: Manifest, path: Path, device: str = "cpu") -> None:
        assert manifest.input is not None and manifest.output is not None  # the validator's
        self.opset = opset_of(read_proto(path))
        if manifest.opset is not None and manifest.opset != self.opset:
            raise ManifestError(path, "opset", f"the file has opset {self.opset}, "
                                f"the manifest says {manifest.opset}")
        self._session = open_session(path, device)
        provider = self._session.get_providers()[0].removesuffix("ExecutionProvider")
        self.version = f"onnxruntime {ort.__version__} ({provider}, opset {self.opset})"
        inputs = {arg.name: tensor_of(arg) for arg in self._session.get_inputs()}
        if len(inputs) != 1:
            raise ManifestError(path, "input.name", f"the model has {len(inputs)} inputs "
                                f"({', '.join(inputs)}); pacs-ai feeds one")
        self.input = inputs[pick(path, "input.name", manifest.input.name, list(inputs),
                                 "input")]
        check_input(path, manifest.input, self.input)
        outputs = {arg.name: tensor_of(arg) for arg in self._session.get_outputs()}
        self.output = outputs[pick(path, "output.name", manifest.output.name, list(outputs),
                                   "output")]
        self.embedding: Tensor | None = None
        if manifest.output.embedding is not None:
            self.embedding = outputs[pick(path, "output.embedding", manifest.output.embedding,
                                          list(outputs), "output")]
        check_output(path, manifest, self.output, self.embedding)
        self._fetch = [t.name for t in (self.output, self.embedding) if t is not None]

    def forward(self, batch: np.ndarray) -> Outputs:
        """The class output (and embedding) of a ready batch."""
        try:
            result = self._session.run(self._fetch, {self.input.name: np.asarray(batch)})
        except ORT_ERRORS as error:
            raise ForwardError(f"onnxruntime failed on the input: {error}") from error
        return Outputs(result[0], result[1] if len(result) > 1 else None)
