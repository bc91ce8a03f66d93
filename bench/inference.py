"""Inference benchmark: the full series path (read, decode, preprocess, CNN, LSTM) against the
pure compiled CNN+LSTM forward on ready tensors, in one run, on a 200-slice 512x512 CT.

Run with `python -m bench.inference`; the last line is machine-readable.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from models.cnn import compile_forward
from models.infer import infer_series
from models.manifest import Manifest, sha256_of, write_manifest
from models.ordering import order_slices
from models.phantom import write_series
from models.preprocess import preprocess_file
from models.registry import Registry, SeriesInfo, build_model

TARGET_RATIO = 1.25


def _manifest(name: str, kind: str, **extra: object) -> Manifest:
    """A seed-sized manifest (224x224x3, 512-wide embedding) with a placeholder sha256."""
    code = {"scheme": "99PACSAI", "meaning": "benchmark"}
    return Manifest.model_validate({
        "name": name, "version": "bench", "kind": kind,
        "classes": [{"name": "normal", "code": {**code, "value": "N"}},
                    {"name": "lesion", "code": {**code, "value": "L"}}],
        "weights_file": "model.weights.h5", "weights_sha256": "0" * 64,
        "intended_use": "benchmark only", "clinical_use": False,
        "preprocessing": {"window": {"center": 40.0, "width": 400.0}}, **extra,
    })


def _write_models(root: Path, seed: int) -> Path:
    """Seed-architecture CNN and LSTM with random but seeded weights, as real model folders."""
    keras.utils.set_random_seed(seed)
    for manifest in (_manifest("bench-cnn", "cnn", input_shape=[224, 224, 3]),
                     _manifest("bench-lstm", "lstm", embedding_model="bench-cnn")):
        folder = root / manifest.name
        folder.mkdir(parents=True)
        build_model(manifest).save_weights(folder / manifest.weights_file)
        digest = sha256_of(folder / manifest.weights_file)
        write_manifest(manifest.model_copy(update={"weights_sha256": digest}), folder)
    return root


def _median_times(
    runs: dict[str, Callable[[], object]], repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds of each run over `repeats` interleaved rounds, after
    one warm-up each, so both sides see the same machine noise. CPU seconds (all threads) are
    the steadier figure on a shared machine."""
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
    """Generate the series and models, time both paths, print the figures and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="reader threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacs-ai-bench-") as tmp:
        root = Path(tmp)
        paths = write_series(root / "series", slices=args.slices, rows=args.size,
                             cols=args.size, lesion=True, seed=7)
        registry = Registry.load(_write_models(root / "models", seed=7))
        (choice,) = registry.select(SeriesInfo.from_files(paths))
        cnn, (lstm,) = choice.cnn, choice.lstms
        shape = cnn.manifest.input_shape
        window = cnn.manifest.preprocessing.window
        ordered = [ref.path for ref in order_slices(paths).slices]
        ready = np.concatenate([preprocess_file(p, shape, window) for p in ordered])
        batches = [tf.constant(ready[i:i + args.batch]) for i in range(0, len(ready), args.batch)]
        pure_cnn = compile_forward(cnn.model)

        def forward_only() -> np.ndarray:
            embedding = np.concatenate([pure_cnn(batch)[1].numpy() for batch in batches])
            return lstm.forward(tf.constant(embedding[np.newaxis])).numpy()

        def full() -> np.ndarray:
            return infer_series(paths, choice, batch_size=args.batch,
                                workers=args.workers).series[0].probabilities

        medians = _median_times({"forward": forward_only, "full": full}, args.repeats)
        (forward_s, forward_cpu), (full_s, full_cpu) = medians["forward"], medians["full"]
        result = infer_series(paths, choice, batch_size=args.batch, workers=args.workers)
    ratio = full_s / forward_s
    print(f"series: {args.slices} slices {args.size}x{args.size} CT, model input {shape}, "
          f"batch {args.batch}, {args.workers} reader threads, median of {args.repeats}")
    print(f"pure forward (CNN+LSTM on ready tensors): {forward_s:.3f} s "
          f"({args.slices / forward_s:.0f} images/s)")
    print(f"full inference (read+decode+preprocess+CNN+LSTM): {full_s:.3f} s "
          f"({args.slices / full_s:.0f} images/s)")
    print(f"last full run: {result.timing}")
    print(f"ratio full/forward: {ratio:.3f} (target <= {TARGET_RATIO})")
    print(f"CPU seconds (all threads): full {full_cpu:.3f}, forward {forward_cpu:.3f}, "
          f"ratio {full_cpu / forward_cpu:.3f}")
    print(f"RESULT inference full_s={full_s:.3f} forward_s={forward_s:.3f} ratio={ratio:.3f} "
          f"cpu_ratio={full_cpu / forward_cpu:.3f}")


if __name__ == "__main__":
    main()
