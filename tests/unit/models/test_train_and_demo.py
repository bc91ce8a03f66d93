"""Training writes a trustworthy model folder; the demo is reproducible and clearly not clinical."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from sklearn.metrics import roc_auc_score

from models.commands import demo_command, list_models, train_command
from models.dataset import TrainingError, read_labels, split_patients
from models.demo import DemoResult, synthesize_series
from models.infer import infer_series
from models.manifest import load_manifest, sha256_of
from models.registry import Choice, LoadedModel, Registry, load_model


def test_demo_manifests_carry_weights_sha256_and_validation(quick_demo: DemoResult) -> None:
    for name in ("demo-cnn", "demo-lstm"):
        folder = quick_demo.models_dir / name
        manifest = load_manifest(folder)
        assert manifest.weights_sha256 == sha256_of(folder / manifest.weights_file)
        assert manifest.validation is not None
        assert manifest.validation.validation_patients >= 2
    cnn = load_manifest(quick_demo.models_dir / "demo-cnn").validation
    assert cnn is not None and cnn.auc["lesion"] >= 0.9, cnn  # held-out patients


def _fresh_slices(
    cnn: LoadedModel, out: Path, *, varied: bool, rows: int
) -> list[tuple[bool, bool, float]]:
    """(lesion on the slice, lesion in its series, lesion probability) for every slice of
    ten fresh phantom series, half with a lesion, of seeds the demo never trained on."""
    scored = []
    for index in range(10):
        series = synthesize_series(
            out / f"{varied}-{rows}-{index}", slices=6, rows=rows, cols=rows,
            lesion=index % 2 == 1, seed=710_000 + index, varied=varied,
        )
        result = infer_series(list(series.paths), Choice(cnn))
        position = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
        for row, probability in zip(result.rows, result.image_probabilities[:, 1], strict=True):
            on_slice = position[row.sop_instance_uid] in series.lesion_slices
            scored.append((on_slice, bool(series.lesion_slices), float(probability)))
    return scored


@pytest.mark.parametrize("rows", [32, 64])
def test_demo_cnn_finds_lesion_slices_and_leaves_the_others_normal_on_fresh_series(
    quick_demo: DemoResult, tmp_path: Path, rows: int
) -> None:
    # The demo cried wolf: ~0.99 "lesion" on slices without one. Lesion-free slices, also
    # those of a series with a lesion elsewhere, must stay under the class threshold.
    cnn = load_model(quick_demo.models_dir / "demo-cnn")
    threshold = cnn.manifest.classes[1].threshold
    scored = _fresh_slices(cnn, tmp_path, varied=False, rows=rows)
    truth = [on_slice for on_slice, _, _ in scored]
    probabilities = [p for _, _, p in scored]
    assert roc_auc_score(truth, probabilities) >= 0.95
    beside_lesion = [p for on_slice, in_series, p in scored if in_series and not on_slice]
    assert beside_lesion and max(beside_lesion) < threshold


def test_demo_is_marked_not_for_clinical_use(quick_demo: DemoResult) -> None:
    for manifest in (quick_demo.cnn, quick_demo.lstm):
        assert manifest.clinical_use is False
        assert "Demonstration only" in manifest.intended_use
        assert {label.code.scheme for label in manifest.classes} == {"99PACSAI"}
        assert all("Demo" in label.code.meaning for label in manifest.classes)


def test_demo_lstm_names_the_demo_cnn(quick_demo: DemoResult) -> None:
    assert quick_demo.lstm.embedding_model == "demo-cnn"
    registry = Registry.load(quick_demo.models_dir)
    assert [m.name for m in registry.cnns] == ["demo-cnn"]


def test_phantom_is_real_ct_with_rescale_and_stepping_positions(tmp_path: Path) -> None:
    written = synthesize_series(
        tmp_path, slices=3, rows=32, cols=32, lesion=True, seed=1, patient_id="P1"
    )
    datasets = [pydicom.dcmread(path) for path in written.paths]
    assert {ds.SOPClassUID.name for ds in datasets} == {"CT Image Storage"}
    assert [float(ds.ImagePositionPatient[2]) for ds in datasets] == [0.0, 5.0, 10.0]
    assert {ds.PatientID for ds in datasets} == {"P1"}
    assert float(datasets[0].RescaleIntercept) == -1024.0
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    assert written.lesion_slices and max(written.lesion_slices) < 3


def test_phantom_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    first = synthesize_series(tmp_path / "a", slices=2, rows=16, cols=16, lesion=True, seed=4)
    second = synthesize_series(tmp_path / "b", slices=2, rows=16, cols=16, lesion=True, seed=4)
    assert first.sop_instance_uids == second.sop_instance_uids
    assert first.paths[1].read_bytes() == second.paths[1].read_bytes()


def test_split_keeps_each_patient_on_one_side() -> None:
    patients = {f"P{i}": {"lesion" if i % 2 else "normal"} for i in range(10)}
    train, validation = split_patients(patients, 0.2, seed=0)
    assert train.isdisjoint(validation) and train | validation == set(patients)
    assert len(validation) == 2  # one per stratum


def test_a_single_patient_cannot_be_split() -> None:
    with pytest.raises(TrainingError, match="need at least two"):
        split_patients({"P1": {"normal"}}, 0.2, seed=0)


def test_labels_csv_needs_a_label_column(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("SOPInstanceUID,finding\n1.2.3,x\n")
    with pytest.raises(TrainingError, match="needs a 'label' column"):
        read_labels(path)


def test_train_command_trains_a_cnn_from_dicom_and_labels(
    quick_demo: DemoResult, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "site-cnn"
    code = train_command(
        quick_demo.data_dir, quick_demo.labels_csv, "cnn", out, epochs=1, input_size=24
    )
    assert code == 0
    manifest = load_manifest(out)
    assert manifest.name == "site-cnn" and manifest.input_shape == (24, 24, 3)
    assert manifest.selection.modalities == ["CT"]
    assert "validation:" in capsys.readouterr().out


def test_train_command_lstm_without_cnn_is_bad_usage(
    quick_demo: DemoResult, tmp_path: Path
) -> None:
    assert train_command(quick_demo.data_dir, quick_demo.labels_csv, "lstm", tmp_path) == 2


def test_train_command_unknown_kind_is_bad_usage(quick_demo: DemoResult, tmp_path: Path) -> None:
    assert train_command(quick_demo.data_dir, quick_demo.labels_csv, "gru", tmp_path) == 2


def test_list_models_prints_json_with_weights_checked(
    quick_demo: DemoResult, capsys: pytest.CaptureFixture
) -> None:
    assert list_models(quick_demo.models_dir, as_json=True) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["name"], row["weights"]) for row in rows] == [
        ("demo-cnn", "ok"),
        ("demo-lstm", "ok"),
    ]


def test_list_models_reports_a_bad_manifest_as_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.toml").write_text('name = "x"\n')
    assert list_models(tmp_path, as_json=False) == 2
    assert "manifest.toml: " in capsys.readouterr().err


def test_demo_command_quick_writes_both_models(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert demo_command(tmp_path, quick=True) == 0
    assert (tmp_path / "models" / "demo-cnn" / "manifest.toml").is_file()
    assert (tmp_path / "models" / "demo-lstm" / "manifest.toml").is_file()
    assert "demo-lstm: validation" in capsys.readouterr().out


def _demo_in_fresh_process(out: Path) -> tuple[str, str]:
    """The weights digests of a tiny demo trained in a new interpreter (fresh global state)."""
    script = ("import sys; from pathlib import Path; from models.demo import DemoConfig, make_demo;"
              "c = DemoConfig(patients=6, slices=3, rows=32, input_size=32, cnn_epochs=1,"
              " lstm_epochs=1);"
              "r = make_demo(Path(sys.argv[1]), c, progress=False);"
              "print(r.cnn.weights_sha256, r.lstm.weights_sha256)")
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).parents[3], timeout=120)
    cnn, lstm = done.stdout.split()[-2:]
    return cnn, lstm


def test_demo_is_reproducible_bit_for_bit_across_runs(tmp_path: Path) -> None:
    assert _demo_in_fresh_process(tmp_path / "a") == _demo_in_fresh_process(tmp_path / "b")


def test_train_command_trains_an_lstm_on_an_existing_cnn(quick_demo: DemoResult,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "site-lstm"
    cnn = quick_demo.models_dir / "demo-cnn"
    assert train_command(quick_demo.data_dir, quick_demo.labels_csv, "lstm", out, cnn=cnn,
                         epochs=1) == 0
    manifest = load_manifest(out)
    assert manifest.embedding_model == "demo-cnn" and manifest.embedding_width == 512
    assert manifest.validation is not None and manifest.validation.validation_patients >= 2


def test_training_into_a_log_writes_one_line_per_epoch_and_no_progress_frames(
    quick_demo: DemoResult, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # The first `make run` logged ~70 KB of redrawn progress bars; captured stderr is no tty.
    assert train_command(
        quick_demo.data_dir, quick_demo.labels_csv, "cnn", tmp_path / "m", epochs=2, input_size=24
    ) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    epochs = [line for line in err.splitlines() if line.startswith("training cnn: epoch ")]
    assert [line.split()[3] for line in epochs] == ["1/2", "2/2"]
    assert all(re.search(r"loss \d+\.\d{4} accuracy \d\.\d{3}$", line) for line in epochs)
