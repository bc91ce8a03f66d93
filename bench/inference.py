"""Inference benchmark per model format, on a 200-slice 512x512 CT: the full series path (read,
decode, preprocess, forward) against the pure forward on ready tensors, each format in one run.

- seed: the seed CNN (224x224x3, 512-wide embedding) and LSTM under TensorFlow;
- onnx: the same CNN weights exported to ONNX (Keras' own exporter), the seed LSTM on its
  embedding;
- keras: a keras.applications MobileNetV2 (224x224x3) as a whole `.keras` model;
- volume: a 3D ONNX classifier reading the series as one 64x128x128 volume (resampled at the
  slices' positions), Conv 3D 64/64/128/256 as in Keras' 3D CT classification example.

The seed CNN alone under TensorFlow and under ONNX Runtime is timed too (images/s, side by
side). Run with `python -m bench.inference`; the `RESULT` lines are machine-readable.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from models.cnn import with_embedding
from models.examples import export_onnx, volume_onnx
from models.infer import infer_series
from models.manifest import Manifest, sha256_of, write_manifest
from models.ordering import order_slices
from models.phantom import write_series
from models.preprocess import decode_frames
from models.registry import Choice, LoadedModel, Registry, SeriesInfo, build_model, load_model
from models.volume import infer_volume, read_volume

TARGET_RATIO = 1.25
WINDOW = {"center": 40.0, "width": 400.0}
CODE = {"scheme": "99PACSAI", "meaning": "benchmark"}
CLASSES = [{"name": "normal", "code": {**CODE, "value": "N"}},
           {"name": "lesion", "code": {**CODE, "value": "L"}}]
VOLUME_SHAPE = [64, 128, 128]
# The layer widths of Keras' own 3D CT classifier example (keras.io/examples/vision/
# 3D_image_classification: Conv3D 64, 64, 128, 256 with max pooling, on 128x128x64 CT
# volumes), about 40 GFLOP a series: a real 3D model's cost, not a toy's.
VOLUME_WIDTHS = (64, 64, 128, 256)


COMMON = {"version": "bench", "classes": CLASSES, "intended_use": "benchmark only",
          "clinical_use": False}


def _folder(root: Path, fields: dict, source: Path | None = None) -> Path:
    """A model folder: its file (moved from `source`, or written there already) and a
    manifest carrying the file's sha256."""
    folder = root / fields["name"]
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        source.rename(folder / fields["weights_file"])
    digest = sha256_of(folder / fields["weights_file"])
    write_manifest(Manifest.model_validate({**COMMON, **fields, "weights_sha256": digest}),
                   folder)
    return folder


def seed_pair(root: Path, seed: int) -> Path:
    """Seed-architecture CNN and LSTM with random but seeded weights, as real model folders."""
    keras.utils.set_random_seed(seed)
    for fields in ({"name": "bench-cnn", "kind": "cnn", "input_shape": [224, 224, 3]},
                   {"name": "bench-lstm", "kind": "lstm", "embedding_model": "bench-cnn"}):
        fields = {**fields, "weights_file": "model.weights.h5",
                  "preprocessing": {"window": WINDOW}}
        manifest = Manifest.model_validate({**COMMON, **fields, "weights_sha256": "0" * 64})
        (root / manifest.name).mkdir(parents=True)
        build_model(manifest).save_weights(root / manifest.name / manifest.weights_file)
        _folder(root, fields)
    return root


def _image_input() -> dict:
    return {"level": "image", "layout": "NHWC", "shape": [224, 224], "channels": 3,
            "window": WINDOW}


def _onnx_pair(root: Path, seed_dir: Path, scratch: Path) -> Path:
    """The seed CNN's weights exported to ONNX (with its embedding), beside the seed LSTM."""
    cnn = load_model(seed_dir / "bench-cnn").model
    exported = export_onnx(with_embedding(cnn), scratch / "bench-cnn.onnx")
    _folder(root, {"name": "bench-cnn", "format": "onnx", "weights_file": "bench-cnn.onnx",
                   "input": _image_input(),
                   "output": {"activation": "none", "name": "Identity:0",
                              "embedding": "Identity_1:0"}}, exported)
    (root / "bench-lstm").symlink_to(seed_dir / "bench-lstm")
    return root


def _keras_model(root: Path, scratch: Path, seed: int) -> Path:
    """A MobileNetV2 (random weights) as a whole .keras model."""
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None, classes=2)
    model.save(scratch / "mobilenet.keras")
    return _folder(root, {"name": "bench-keras", "format": "keras",
                          "weights_file": "mobilenet.keras", "input": _image_input(),
                          "output": {"activation": "none"}}, scratch / "mobilenet.keras").parent


def _volume_model(root: Path, scratch: Path, seed: int) -> Path:
    """A 3D ONNX classifier over a 64x128x128 volume."""
    depth, rows, columns = VOLUME_SHAPE
    exported = volume_onnx(scratch / "volume.onnx", "NCDHW", depth=depth, rows=rows,
                           columns=columns, widths=VOLUME_WIDTHS, seed=seed)
    return _folder(root, {"name": "bench-volume", "format": "onnx",
                          "weights_file": "volume.onnx",
                          "input": {"level": "series", "layout": "NCDHW", "shape": VOLUME_SHAPE,
                                    "channels": 1, "normalisation": "range", "min": -1000,
                                    "max": 400},
                          "output": {"activation": "none"}}, exported).parent


def _ready_batches(cnn: LoadedModel, paths: list[Path], batch: int) -> list[np.ndarray]:
    """The series' images as the CNN's input batches, in slice order, made once."""
    spec = cnn.manifest.reads
    ordered = [ref.path for ref in order_slices(paths).slices]
    frames = np.stack([f for p in ordered for f in decode_frames(p, spec.intensity, spec.shape)])
    assert cnn.prepare is not None
    return [np.asarray(cnn.prepare(tf.constant(frames[i:i + batch])))
            for i in range(0, len(frames), batch)]


def image_runs(choice: Choice, paths: list[Path], batch: int, workers: int
               ) -> tuple[Callable[[], object], Callable[[], object], Callable[[], object]]:
    """(full path, pure forward with the LSTMs, pure CNN forward) of an image model."""
    batches = _ready_batches(choice.cnn, paths, batch)
    runtime = choice.cnn.runtime

    def cnn_only() -> list:
        return [runtime.forward(b) for b in batches]

    def forward() -> object:
        outputs = cnn_only()
        if not choice.lstms:
            return outputs
        embedding = np.concatenate([o.embedding for o in outputs])
        return [lstm.predict(embedding[np.newaxis]) for lstm in choice.lstms]

    def full() -> object:
        return infer_series(paths, choice, batch_size=batch, workers=workers)

    return full, forward, cnn_only


def _median_times(
    runs: dict[str, Callable[[], object]], repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds of each run over `repeats` interleaved rounds, after
    one warm-up each, so all see the same machine noise. CPU seconds (all threads) are the
    steadier figure on a shared machine."""
    for run in runs.values():
        run()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in runs}


def main() -> None:
    """Generate the series and models, time each format's two paths, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="reader threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacs-ai-bench-") as tmp:
        root = Path(tmp)
        (root / "scratch").mkdir()
        paths = write_series(root / "series", slices=args.slices, rows=args.size,
                             cols=args.size, lesion=True, seed=7)
        info = SeriesInfo.from_files(paths)
        seed_dir = seed_pair(root / "seed", seed=7)
        dirs = {"seed": seed_dir,
                "onnx": _onnx_pair(root / "onnx", seed_dir, root / "scratch"),
                "keras": _keras_model(root / "keras", root / "scratch", seed=7)}
        runs: dict[str, Callable[[], object]] = {}
        for name, folder in dirs.items():
            (choice,) = Registry.load(folder).select(info)
            full, forward, cnn_only = image_runs(choice, paths, args.batch, args.workers)
            runs |= {f"{name} full": full, f"{name} forward": forward}
            if name in ("seed", "onnx"):
                runs[f"{name} cnn"] = cnn_only
        (volume,) = Registry.load(_volume_model(root / "volume", root / "scratch",
                                                seed=7)).volumes
        ready = read_volume(paths, volume, args.workers).batch
        runs["volume full"] = lambda: infer_volume(paths, volume, workers=args.workers)
        runs["volume forward"] = lambda: volume.runtime.forward(ready)
        gc.freeze()  # as a worker does once its models are loaded (daemon.worker.make_context)
        medians = _median_times(runs, args.repeats)
    print(f"series: {args.slices} slices {args.size}x{args.size} CT, batch {args.batch}, "
          f"{args.workers} reader threads, median of {args.repeats}")
    for name in ("seed", "onnx", "keras", "volume"):
        (full_s, full_cpu), (forward_s, forward_cpu) = (medians[f"{name} full"],
                                                        medians[f"{name} forward"])
        ratio, cpu_ratio = full_s / forward_s, full_cpu / forward_cpu
        print(f"{name:>6}: full {full_s:.3f} s, pure forward {forward_s:.3f} s, ratio "
              f"{ratio:.3f} (target <= {TARGET_RATIO}); CPU ratio {cpu_ratio:.3f}")
        print(f"RESULT inference format={name} full_s={full_s:.3f} forward_s={forward_s:.3f} "
              f"ratio={ratio:.3f} cpu_ratio={cpu_ratio:.3f}")
    tf_cnn, onnx_cnn = medians["seed cnn"][0], medians["onnx cnn"][0]
    print(f"seed CNN alone, {args.slices} images: TensorFlow {tf_cnn:.3f} s "
          f"({args.slices / tf_cnn:.0f} images/s), ONNX Runtime {onnx_cnn:.3f} s "
          f"({args.slices / onnx_cnn:.0f} images/s)")
    print(f"RESULT inference format=cnn tf_images_per_s={args.slices / tf_cnn:.1f} "
          f"onnx_images_per_s={args.slices / onnx_cnn:.1f}")


if __name__ == "__main__":
    main()
