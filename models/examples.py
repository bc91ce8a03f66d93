"""Small model files in every format, made on the spot (nothing downloaded): a keras.applications
backbone saved as `.keras`, a Keras model exported to ONNX, and a 3D series classifier written
with onnx.helper. For tests, the benchmark and trying a setup; never for clinical use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.manifest import Layout

BACKBONE_EMBEDDING = "pooled"


def keras_backbone(path: Path, input_size: int = 32, classes: int = 2, seed: int = 0
                   ) -> keras.Model:
    """A MobileNetV2 (width 0.35, random weights) with a pooled embedding and a softmax head,
    saved as a whole `.keras` model: a Keras network of another shape than the seed's."""
    keras.utils.set_random_seed(seed)
    # Named, so the file's input is called the same whatever Keras built before in the process.
    image = keras.Input(shape=(input_size, input_size, 3), name="image")
    base = keras.applications.MobileNetV2(input_tensor=image, alpha=0.35, include_top=False,
                                          weights=None)
    pooled = keras.layers.GlobalAveragePooling2D(name=BACKBONE_EMBEDDING)(base.output)
    outputs = keras.layers.Dense(classes, activation="softmax", name="probabilities")(pooled)
    model = keras.Model(image, outputs, name="backbone")
    model.save(path)
    return model


def export_onnx(model: keras.Model, path: Path) -> Path:
    """A Keras model exported with Keras' own `model.export(..., format="onnx")` (tf2onnx)."""
    zeros = np.zeros((1, *model.inputs[0].shape[1:]), np.float32)
    model([zeros] if isinstance(model.input, list) else zeros)  # export wants a called model
    model.export(str(path), format="onnx", verbose=False)
    return path


def volume_onnx(path: Path, layout: Layout = "NCDHW", *, depth: int = 8, rows: int = 16,
                columns: int = 16, classes: int = 2, channels: int = 1,
                widths: Sequence[int] = (4,), softmax: bool = True, batch: int | None = None,
                seed: int = 0) -> Path:
    """A 3D classifier (Conv 3D and ReLU per width, 2x2x2 max pooling between, global average
    pool, Gemm, Softmax) in either layout; the same seed gives the same weights in both, so
    both answer alike."""
    rng = np.random.default_rng(seed)
    dims: list[int | str] = [batch or "N"]
    dims += ([channels, depth, rows, columns] if layout == "NCDHW"
             else [depth, rows, columns, channels])
    nodes, weights = [], []
    current = "volume"
    if layout == "NDHWC":
        nodes.append(helper.make_node("Transpose", ["volume"], ["ncdhw"], perm=[0, 4, 1, 2, 3]))
        current = "ncdhw"
    previous = channels
    for index, width in enumerate(widths):
        if index:
            nodes.append(helper.make_node("MaxPool", [current], [f"pool{index}"],
                                          kernel_shape=[2, 2, 2], strides=[2, 2, 2]))
            current = f"pool{index}"
        scale = np.sqrt(2.0 / (27 * previous))
        kernel = rng.normal(0.0, scale, (width, previous, 3, 3, 3)).astype(np.float32)
        weights.append(numpy_helper.from_array(kernel, f"kernel{index}"))
        nodes += [helper.make_node("Conv", [current, f"kernel{index}"], [f"conv{index}"],
                                   pads=[1] * 6),
                  helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"])]
        current, previous = f"relu{index}", width
    dense = rng.normal(0.0, 1.0, (classes, previous)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, (classes,)).astype(np.float32)
    weights += [numpy_helper.from_array(dense, "dense"), numpy_helper.from_array(bias, "bias")]
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "dense", "bias"], ["logits"], transB=1),
    ]
    output = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
        output = "probabilities"
    graph = helper.make_graph(
        nodes, "volume-classifier",
        [helper.make_tensor_value_info("volume", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch or "N", classes])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="pacs-ai examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
