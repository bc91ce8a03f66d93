"""Storage commitment reports that come on a new association to our AE (the receiver's
handler, daemon.receive.commitment), over a real pynetdicom association, on both backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy import Engine

from daemon.db import migrate
from daemon.db.engine import make_engine
from daemon.db.keys import resend_key
from daemon.dicom.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    add_commitment_context,
    commitment_report,
)
from daemon.dicom.status import (
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_EVENT_TYPE,
    NO_SUCH_OBJECT_INSTANCE,
    SUCCESS,
)
from daemon.receive.commitment import handle_commitment_report
from tests.unit.dispatch.dicomfiles import add_dispatch
from tests.unit.dispatch.test_verify import jobs, row, send, settings_for

OUR_AE = "PACSAI"


@pytest.fixture
def db(db_url: str) -> Iterator[Engine]:
    """A database at head, once on SQLite and once on PostgreSQL."""
    eng = make_engine(db_url)
    migrate.upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def receiver(db: Engine) -> Iterator[int]:
    """Our AE as the receiver wires it: commitment context and the report handler bound."""
    ae = AE(ae_title=OUR_AE)
    add_commitment_context(ae)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, handle_commitment_report, [db, 5])],
    )
    yield int(server.server_address[1])
    server.shutdown()


def report(port: int, event_type: int, info: Dataset) -> int:
    """Send one N-EVENT-REPORT the way a PACS does (SCP role by role selection); its status."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AE, ext_neg=[role])
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_event_report(
            info, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
    finally:
        assoc.release()
    return int(status.Status)


def kept(uid: str) -> tuple[str, str]:
    return (Comprehensive3DSRStorage, uid)


def lost(uid: str) -> tuple[str, str, int]:
    return (Comprehensive3DSRStorage, uid, NO_SUCH_OBJECT_INSTANCE)


def sent_commitment_row(db: Engine, sr_pair: tuple[Path, Path], tmp_path: Path) -> int:
    dispatch_id = add_dispatch(db, *sr_pair, destination="pacs")
    send(db, settings_for(tmp_path, 104, "commitment"))
    return dispatch_id


def test_success_report_on_a_new_association_confirms(
    db: Engine, receiver: int, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_commitment_row(db, sr_pair, tmp_path)
    transaction = row(db, dispatch_id).transaction_uid
    assert transaction
    assert report(receiver, *commitment_report(transaction, [kept("1.2.3")])) == SUCCESS
    confirmed = row(db, dispatch_id)
    assert confirmed.state == "confirmed"
    assert confirmed.confirmed_at is not None
    assert confirmed.last_status == "storage commitment: 1 committed"


def test_failure_report_on_a_new_association_sends_again(
    db: Engine, receiver: int, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_commitment_row(db, sr_pair, tmp_path)
    transaction = row(db, dispatch_id).transaction_uid
    assert transaction
    assert report(receiver, *commitment_report(transaction, [], [lost("1.2.3")])) == SUCCESS
    assert row(db, dispatch_id).state == "pending"
    resend = {j.key: j for j in jobs(db, "dispatch")}[resend_key(dispatch_id, 1)]
    assert resend.state == "queued" and resend.max_attempts == 5


def test_report_for_an_unknown_transaction_is_acknowledged_and_ignored(
    db: Engine, receiver: int, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = sent_commitment_row(db, sr_pair, tmp_path)
    assert report(receiver, *commitment_report(generate_uid(), [kept("1.2.3")])) == SUCCESS
    assert row(db, dispatch_id).state == "sent"


def test_report_of_another_event_type_is_refused(receiver: int) -> None:
    _, info = commitment_report(generate_uid(), [])
    status = report(receiver, 3, info)
    assert status == NO_SUCH_EVENT_TYPE


def test_report_without_a_transaction_uid_is_refused(receiver: int) -> None:
    info = Dataset()
    info.ReferencedSOPSequence = []
    assert report(receiver, 1, info) == INVALID_ARGUMENT_VALUE
