"""The tables: every step of the flow is a row, so a crash resumes from the last commit."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID = String(64)
AE = String(16)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC on both engines (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return None if value is None else value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    """The one clock every row is stamped with."""
    return dt.datetime.now(dt.UTC)


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Study(Base):
    """A study; `version` is the one new instances join until it is queued for analysis."""

    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    changed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    body_part: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Instance(Base):
    """One stored file; a changed resend adds a row and marks the older one superseded."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "sha256"),
        # Every look-up by study, and the console's: a study's open version, its counts and
        # calling AEs (from the index alone), the studies of a calling AE, and what arrived
        # in the last minutes and hours.
        Index("ix_instances_study", "study_id", "study_version", "calling_ae"),
        Index("ix_instances_calling_ae_study_id", "calling_ae", "study_id"),
        Index("ix_instances_received_at", "received_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    study_version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(AE)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    superseded_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class JobState(enum.StrEnum):
    """Where a job is; stored as its text, so rows read back compare equal to a member."""

    QUEUED = "queued"  # due at `run_after` (a failed attempt waits there for its retry)
    RUNNING = "running"  # leased by a worker
    DONE = "done"
    DEAD = "dead"  # out of attempts, or failed for good; an operator may retry it
    CANCELLED = "cancelled"  # stopped by an operator


class Job(Base):
    """A unit of work with a lease; the queue in `daemon.db.queue` is its only writer."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim", "state", "run_after"),
        # Every look-up by study, and the console's: where each study stands.
        Index("ix_jobs_study_id_state", "study_id", "state"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(255), unique=True)
    study_id: Mapped[int | None] = mapped_column(
        ForeignKey("studies.id", ondelete="CASCADE"), nullable=True
    )
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    run_after: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Result(Base):
    """One model output for one study version: an image-level or series-level probability."""

    __tablename__ = "results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    series_uid: Mapped[str] = mapped_column(UID)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    frame_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ReportKind(enum.StrEnum):
    """What a report file is: the Structured Report, or a heatmap image it references."""

    SR = "sr"
    HEATMAP = "heatmap"


class Report(Base):
    """A Structured Report written to the spool for one study version."""

    __tablename__ = "reports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    kind: Mapped[str] = mapped_column(String(16), default=ReportKind.SR, server_default="sr")
    path: Mapped[str] = mapped_column(Text)
    fallback_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Indexed for the console's chart of studies reported per hour.
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class DispatchState(enum.StrEnum):
    """Where one report stands with one destination (daemon.db.deliveries has the rules)."""

    PENDING = "pending"  # to be sent (again)
    SENT = "sent"  # the destination took it; confirmed or not yet, per its `verify`
    CONFIRMED = "confirmed"  # the destination proved it keeps it
    DEAD = "dead"  # its dispatch job gave up
    CANCELLED = "cancelled"  # its dispatch job was cancelled by an operator


# Report kinds as operators read them (`jobs show`, `reports send`).
REPORT_KIND_NAMES = {ReportKind.SR: "SR", ReportKind.HEATMAP: "heatmap"}


class Dispatch(Base):
    """The outbox: one row per report and destination, sent by a `dispatch` job."""

    __tablename__ = "dispatches"
    __table_args__ = (
        UniqueConstraint("report_id", "destination"),
        # The console: each destination's last delivery.
        Index("ix_dispatches_destination_sent_at", "destination", "sent_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DispatchState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_sop_class_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    transaction_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    verify_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    confirmed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class CloseReason(enum.StrEnum):
    """Why a study version stopped taking instances (daemon.assemble decides, one home)."""

    MPPS = "mpps"  # the modality's MPPS said the procedure ended and its images are here
    EVIDENCE = "evidence"  # every series holds what its images declare, and a short pause
    QUIET = "quiet"  # nothing arrived for the quiet window
    SWEEP = "sweep"  # the safety sweep found it quiet (after a restart or a lost timer)
    REPLAY = "replay"  # an operator asked for the study to be analysed again


class ClosedVersion(Base):
    """A study version queued for analysis: when, why, and what the SR must say about it."""

    __tablename__ = "closed_versions"
    __table_args__ = (UniqueConstraint("study_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(16))
    # UIDs only: the MPPS step, incomplete series, discontinuation.
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    closed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class MppsState(enum.StrEnum):
    """Performed Procedure Step Status (0040,0252) as the modality sends it."""

    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


class MppsStep(Base):
    """A Modality Performed Procedure Step a modality created (N-CREATE) and ended (N-SET)."""

    __tablename__ = "mpps_steps"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    calling_ae: Mapped[str] = mapped_column(AE)
    # The study named first, as logs and the console show the step; the studies it belongs
    # to are its mpps_step_studies and those holding its mpps_step_series.
    study_uid: Mapped[str] = mapped_column(UID)
    state: Mapped[str] = mapped_column(String(16), default=MppsState.IN_PROGRESS)
    # {"series": [series UID...], "instances": [[series UID, SOP Class UID, SOP Instance
    # UID]...]}: the Performed Series Sequence as the modality last set it.
    performed: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    discontinued_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The study version whose closing took the step into account; set once.
    closed_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class MppsStepStudy(Base):
    """A study an MPPS step was scheduled for (grouped procedures name several)."""

    __tablename__ = "mpps_step_studies"
    step_id: Mapped[int] = mapped_column(
        ForeignKey("mpps_steps.id", ondelete="CASCADE"), primary_key=True
    )
    study_uid: Mapped[str] = mapped_column(UID, primary_key=True, index=True)


class MppsStepSeries(Base):
    """A series an MPPS step says it made. The images may carry a Study Instance UID the step
    does not name (PS3.17 J.4: for grouped procedures the modality picks one scheduled
    study's or makes a new one), so a step finds its study by its series as well."""

    __tablename__ = "mpps_step_series"
    step_id: Mapped[int] = mapped_column(
        ForeignKey("mpps_steps.id", ondelete="CASCADE"), primary_key=True
    )
    series_uid: Mapped[str] = mapped_column(UID, primary_key=True, index=True)


class CommitmentState(enum.StrEnum):
    """Where a modality's Storage Commitment request stands with its report."""

    PENDING = "pending"  # N-ACTION answered; the N-EVENT-REPORT is still to be delivered
    REPORTED = "reported"  # the modality acknowledged the N-EVENT-REPORT
    DEAD = "dead"  # the report job gave up; an operator may retry it
    CANCELLED = "cancelled"  # its report job was cancelled by an operator


class CommitmentRequest(Base):
    """A Storage Commitment N-ACTION a modality sent us, and the report it gets back."""

    __tablename__ = "commitment_requests"
    __table_args__ = (UniqueConstraint("calling_ae", "transaction_uid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(UID)
    calling_ae: Mapped[str] = mapped_column(AE)
    state: Mapped[str] = mapped_column(String(16), default=CommitmentState.PENDING)
    # [SOP Class UID, SOP Instance UID] pairs, as requested.
    requested: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # Decided once, before the first report goes out, so every attempt says the same.
    committed: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    failed: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    decided_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reported_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_status: Mapped[str | None] = mapped_column(Text, nullable=True)


class AuditEvent(Base):
    """Append-only audit trail; each row carries the hash of the previous one (a chain)."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    event: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(UID, nullable=True, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class DestinationProbe(Base):
    """The last C-ECHO (or QIDO-RS probe) of each destination, so pages read, never probe."""

    __tablename__ = "destination_probes"
    destination: Mapped[str] = mapped_column(String(64), primary_key=True)
    ok: Mapped[bool] = mapped_column(Boolean)
    answer: Mapped[str] = mapped_column(Text)
    probed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ConsoleSession(Base):
    """A signed-in console user; the cookie holds a random token, the row only its sha256."""

    __tablename__ = "console_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
