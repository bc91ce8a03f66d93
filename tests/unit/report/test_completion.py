"""How a study version ended, in its SR: an incomplete or discontinued procedure is stated
as text and makes the document PARTIAL; dciodvfy still finds no error."""

from __future__ import annotations

from pathlib import Path

from highdicom.sr.utils import find_content_items
from pydicom import Dataset
from pydicom.sr.codedict import codes

from daemon.report import build_no_applicable_model_sr, build_sr, series_uid, sr_uid
from daemon.report.completion import Completion
from tests.unit.report.studies import DEVICE, ct_series, series_finding
from tests.validators import require, run_dciodvfy

DETAIL = {
    "mpps": ["1.2.3.4"],
    "incomplete_series": [{"series": "1.2.3.5", "arrived": 18, "expected": 20}],
    "discontinued": [{"step": "1.2.3.4", "reason": "Patient refused"}],
}


def _texts(ds: Dataset) -> list[str]:
    return [
        str(i.TextValue) for i in find_content_items(ds, name=codes.DCM.Comment, recursive=True)
    ]


def _uids(sources: list[Dataset]) -> dict[str, object]:
    study = str(sources[0].StudyInstanceUID)
    return {
        "sop_instance_uid": sr_uid(study, 1, ["x"]),
        "series_instance_uid": series_uid(study),
        "series_number": 9001,
        "instance_number": 1,
        "device": DEVICE,
    }


def test_completion_notes_name_the_series_and_the_discontinuation() -> None:
    completion = Completion.from_detail(DETAIL)
    assert completion.partial
    assert completion.notes == (
        "Procedure discontinued by the modality (MPPS 1.2.3.4, reason: Patient refused).",
        "Series 1.2.3.5 incomplete: 18 of the 20 instances the modality reported (MPPS) "
        "arrived before analysis.",
    )
    assert Completion.from_detail({"mpps": ["1.2.3.4"]}) == Completion()
    assert Completion.from_detail(None) == Completion()


def test_partial_procedure_is_stated_in_the_sr_and_flagged(tmp_path: Path) -> None:
    require("dciodvfy")
    sources = ct_series(3)
    completion = Completion.from_detail(DETAIL)
    sr = build_sr(sources, [series_finding(sources)], completion=completion, **_uids(sources))
    assert sr.CompletionFlag == "PARTIAL"
    assert [t for t in _texts(sr) if t in completion.notes] == list(completion.notes)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    verdict = run_dciodvfy(path)
    assert verdict.iod == "Comprehensive3DSR" and not verdict.errors, verdict


def test_no_model_sr_also_says_the_procedure_was_discontinued() -> None:
    sources = ct_series(1)
    completion = Completion.from_detail({"discontinued": [{"step": "1.2.9", "reason": None}]})
    sr = build_no_applicable_model_sr(sources, completion=completion, **_uids(sources))
    assert sr.CompletionFlag == "PARTIAL"
    assert "Procedure discontinued by the modality (MPPS 1.2.9)." in _texts(sr)
