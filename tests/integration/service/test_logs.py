"""At the default level the log never carries patient data, good input or bad."""

from __future__ import annotations

import re

from tests.integration.service.conftest import ServedDay


def test_a_full_run_logs_no_patient_name_or_id(served_day: ServedDay) -> None:
    log = served_day.daemon.log()
    # The run is in the log: receive, analyse, report and dispatch all spoke.
    for line in (r"association established", r"job done job=\d+ kind=analyse", r"kind=dispatch"):
        assert re.search(line, log), line
    assert "--log-level" not in " ".join(served_day.daemon.proc.args)  # the default: info
    assert served_day.patient_id not in log
    assert served_day.patient_name not in log
    assert served_day.patient_name.replace("^", " ") not in log


def test_a_quarantined_instance_logs_no_patient_data(served_day: ServedDay) -> None:
    log = served_day.daemon.log()
    refused = [line for line in log.splitlines() if "instance refused" in line]
    assert len(refused) == 1, refused
    assert "quarantine=" in refused[0]
    assert served_day.bad_patient_id not in log
