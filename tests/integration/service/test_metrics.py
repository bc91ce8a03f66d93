"""/metrics tells how the service is doing, counted across the receiver and the workers."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.service.conftest import BAD_SENDER_AE, ServedDay

Samples = dict[str, list[tuple[dict[str, str], float]]]


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as rsp:
        assert rsp.status == 200
        text = rsp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (a histogram's `le` aside); 0 when absent."""
    for got, value in samples.get(name, []):
        if {k: v for k, v in got.items() if k != "le"} == labels:
            return value
    return 0.0


def test_instances_and_bytes_received_are_counted_by_calling_ae_and_status(
    served_day: ServedDay,
) -> None:
    samples = _scrape(served_day.metrics_port)
    stored = _value(
        samples, "pacsai_instances_received_total", calling_ae="STORESCU", status="0x0000"
    )
    assert stored == len(served_day.files)
    refused = [
        (labels, v)
        for labels, v in samples["pacsai_instances_received_total"]
        if labels["calling_ae"] == BAD_SENDER_AE
    ]
    assert len(refused) == 1 and refused[0][0]["status"] != "0x0000" and refused[0][1] == 1
    file_bytes = sum(f.stat().st_size for f in served_day.files)
    received = _value(samples, "pacsai_received_bytes_total")
    assert 0.5 * file_bytes < received < 1.5 * file_bytes, (received, file_bytes)


def test_a_wrong_called_ae_title_counts_as_a_rejected_association(
    served_day: ServedDay,
) -> None:
    samples = _scrape(served_day.metrics_port)
    rejected = _value(
        samples, "pacsai_associations_rejected_total", reason="called AE title not recognized"
    )
    assert rejected == 1, samples.get("pacsai_associations_rejected_total")
    assert _value(samples, "pacsai_associations_active") == 0


def test_jobs_are_gauged_by_kind_and_state_with_the_oldest_queued_age(
    served_day: ServedDay,
) -> None:
    samples = _scrape(served_day.metrics_port)
    assert _value(samples, "pacsai_jobs", kind="analyse", state="done") == 1
    assert _value(samples, "pacsai_jobs", kind="report", state="done") == 1
    assert _value(samples, "pacsai_jobs", kind="dispatch", state="done") >= 1
    assert {labels["state"] for labels, _v in samples["pacsai_jobs"]} == {"done"}
    assert "pacsai_oldest_queued_seconds" in samples
    assert _value(samples, "pacsai_oldest_queued_seconds") == 0, "nothing waits"
    assert _value(samples, "pacsai_spool_free_bytes") > 0


def test_worker_timings_and_dispatches_reach_the_one_endpoint(served_day: ServedDay) -> None:
    samples = _scrape(served_day.metrics_port)
    assert _value(samples, "pacsai_analysis_seconds_count") >= 1
    inference = samples.get("pacsai_inference_seconds_count", [])
    assert inference and all(labels["model"] for labels, _v in inference)
    assert sum(v for _labels, v in inference) >= 1
    assert _value(samples, "pacsai_dispatch_attempts_total", destination="orthanc") >= 1
    assert _value(samples, "pacsai_dispatch_failures_total", destination="orthanc") == 0
