"""The `pacs-ai` command: every operator action, with exit codes 0 ok, 1 failure, 2 bad usage."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from daemon import __version__
from daemon.config import ConfigError, Settings, config_file, dump_settings, load_settings
from daemon.db.engine import DatabaseMissing, DatabaseNotAtHead
from daemon.db.schema import DispatchState, JobState
from daemon.logsetup import LEVELS, setup_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("daemon.cli")


class CommandFailed(Exception):
    """A runtime failure worth one line to the operator, exit 1."""


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.service import serve

    return serve(_settings(args), args.log_level or "info")


def cmd_worker(args: argparse.Namespace) -> int:
    from daemon.worker import run_standalone

    return run_standalone(_settings(args))


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.status import collect_status, render_status

    report = collect_status(_settings(args), echo=not args.no_echo)
    print(json.dumps(report, indent=2, default=str) if args.json else render_status(report))
    return EXIT_OK


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from daemon.status import list_jobs, render_jobs

    jobs = list_jobs(_settings(args), state=args.state, kind=args.kind, limit=args.limit)
    print(json.dumps(jobs, indent=2, default=str) if args.json else render_jobs(jobs))
    return EXIT_OK


def cmd_jobs_show(args: argparse.Namespace) -> int:
    from daemon.status import render_job_detail, show_job

    job = show_job(_settings(args), args.id)
    if job is None:
        raise CommandFailed(f"job {args.id}: no such job")
    print(json.dumps(job, indent=2, default=str) if args.json else render_job_detail(job))
    return EXIT_OK


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    from daemon.status import operator_retry

    if not operator_retry(_settings(args), args.id):
        raise CommandFailed(f"job {args.id}: not dead or cancelled, nothing to retry")
    print(f"job {args.id} queued again")
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    from daemon.status import operator_cancel

    if not operator_cancel(_settings(args), args.id):
        raise CommandFailed(f"job {args.id}: already finished or unknown")
    print(f"job {args.id} cancelled")
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from daemon.db import audit, migrate

    engine = migrate.open_at_head(_settings(args).storage.effective_database_url)
    try:
        with engine.connect() as conn:
            check = audit.verify(conn)
    finally:
        engine.dispose()
    print(check)
    return EXIT_OK if check.intact else EXIT_FAILURE


def cmd_results_compare(args: argparse.Namespace) -> int:
    from daemon.db import migrate
    from daemon.governance import compare, render_comparison

    engine = migrate.open_at_head(_settings(args).storage.effective_database_url)
    try:
        with engine.connect() as conn:
            comparison = compare(conn, args.model_a, args.model_b)
    finally:
        engine.dispose()
    print(
        json.dumps(comparison.as_dict(), indent=2) if args.json else render_comparison(comparison)
    )
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from daemon.db import migrate
    from daemon.governance import ReplayRefused, check_replayable, known_models, replay

    settings = _settings(args)
    models = [args.model] if args.model else []
    engine = migrate.open_at_head(settings.storage.effective_database_url)
    try:
        check_replayable(engine, args.study_uid)
        known = known_models(settings.models.dir) if models else None
        queued = replay(
            engine,
            args.study_uid,
            max_attempts=settings.retry.max_attempts,
            models=models,
            known=known,
        )
    except ReplayRefused as exc:
        raise CommandFailed(str(exc)) from exc
    finally:
        engine.dispose()
    print(
        f"study {queued.study_uid}: version {queued.study_version} queued for analysis "
        f"(job {queued.job_id}, models: {', '.join(queued.models) or 'all'})"
    )
    return EXIT_OK


def cmd_reports_send(args: argparse.Namespace) -> int:
    from daemon.db import migrate
    from daemon.resend import NothingToSend, send_reports

    settings = _settings(args)
    engine = migrate.open_at_head(settings.storage.effective_database_url)
    try:
        queued = send_reports(engine, settings, args.to, study_uid=args.study, since=args.since)
    except NothingToSend as exc:
        raise CommandFailed(str(exc)) from exc
    finally:
        engine.dispose()
    for item in queued:
        print(item)
    fresh = sum(1 for item in queued if item.was != DispatchState.PENDING)
    print(f"{fresh} of {len(queued)} reports queued for {args.to} (see `pacs-ai status`)")
    return EXIT_OK


def _utc_date(text: str) -> dt.datetime:
    """`2026-11-30` or `2026-11-30T08:00`, taken as UTC unless it names its offset."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (e.g. 2026-11-30)") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from daemon.db import migrate
    from daemon.db.engine import make_engine

    settings = _settings(args)
    engine = make_engine(settings.storage.effective_database_url)
    try:
        migrate.upgrade(engine)
        print(f"database at revision {migrate.current_revision(engine)}")
    finally:
        engine.dispose()
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(dump_settings(settings, config_file(args.config)), end="")
    return EXIT_OK


def cmd_conformance(args: argparse.Namespace) -> int:
    from daemon.receive.conformance import conformance_markdown

    print(conformance_markdown(sop_classes=args.sop_classes), end="")
    return EXIT_OK


def cmd_echo(args: argparse.Namespace) -> int:
    from daemon.dispatch.destinations import address, echo

    settings = _settings(args)
    dest = settings.destination(args.name)
    outcome = echo(dest, settings.dicom.ae_title)
    print(f"{dest.name} ({address(dest)}): {outcome}")
    return EXIT_OK if outcome.ok else EXIT_FAILURE


def cmd_models_list(args: argparse.Namespace) -> int:
    from models.commands import list_models

    directory = args.dir or _settings(args).models.dir
    return list_models(Path(directory), as_json=args.json)


def cmd_models_train(args: argparse.Namespace) -> int:
    from models.commands import train_command

    return train_command(
        data=args.data,
        labels=args.labels,
        kind=args.kind,
        out=args.out,
        cnn=args.cnn,
        epochs=args.epochs,
    )


def cmd_models_demo(args: argparse.Namespace) -> int:
    from models.commands import demo_command

    return demo_command(out=args.out, quick=args.quick)


def cmd_models_check(args: argparse.Namespace) -> int:
    from models.commands import check_command

    settings = _settings(args)
    directory = args.dir or settings.models.dir
    return check_command(Path(directory), args.study, settings.models.device)


def cmd_models_import(args: argparse.Namespace) -> int:
    from models.commands import import_command

    return import_command(args.file, args.out, args.name, args.version, args.format)
def cmd_http_token(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from daemon.config import HttpToken
    from daemon.http.auth import new_token

    token, digest = new_token()
    try:
        entry = HttpToken(name=args.name, sha256=digest, role=args.role)
    except ValidationError as exc:
        raise ConfigError(f"http.tokens.name: {exc.errors()[0]['msg']}") from exc
    # The token on stderr, the entry on stdout: `>> pacs-ai.toml` never stores the token.
    print(
        f"token for {entry.name} (shown once; give it to the client, the configuration "
        f"keeps only its sha256):\n{token}",
        file=sys.stderr,
    )
    print("[[http.tokens]]")
    print(f'name = "{entry.name}"')
    print(f'sha256 = "{entry.sha256}"')
    print(f'role = "{entry.role}"')
    return EXIT_OK


MIN_PASSWORD = 10


def _read_password() -> str:
    """From the terminal (asked twice), or the first line of standard input (scripts)."""
    import getpass

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise CommandFailed("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        raise CommandFailed(f"a password needs at least {MIN_PASSWORD} characters")
    return password


def cmd_http_user(args: argparse.Namespace) -> int:
    from argon2 import PasswordHasher
    from pydantic import ValidationError

    from daemon.config import HttpUser

    password = _read_password()
    try:
        entry = HttpUser(name=args.name, password_hash=PasswordHasher().hash(password),
                         role=args.role)  # fmt: skip
    except ValidationError as exc:
        raise ConfigError(f"http.users.name: {exc.errors()[0]['msg']}") from exc
    print("[[http.users]]")
    print(f'name = "{entry.name}"')
    print(f'password_hash = "{entry.password_hash}"')
    print(f'role = "{entry.role}"')
    return EXIT_OK


def cmd_http_console(args: argparse.Namespace) -> int:
    from daemon.http.console import console_url

    http = _settings(args).http
    if not http.port:
        raise CommandFailed("the HTTP server is off: set [http] port to serve the console")
    print(f"console: {console_url(http)}")
    password = args.password_file
    users = ", ".join(f"{u.name} ({u.role})" for u in http.users)
    if password is not None and password.is_file() and any(u.name == "admin" for u in http.users):
        print(f"log in as admin with the password in {password}: {password.read_text().strip()}")
    elif users:
        print(f"users: {users}")
    else:
        print(
            "no console user yet: `pacs-ai http user NAME --role operator >> CONFIG` makes one; "
            "scripts may use a bearer token of [[http.tokens]] instead"
        )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; each leaf sets `func`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file (default: $PACSAI_CONFIG, else /etc/pacs-ai/pacs-ai.toml if it exists)",
    )
    common.add_argument("--log-level", choices=LEVELS, default=None, help="default: info")

    parser = argparse.ArgumentParser(
        prog="pacs-ai",
        description="DICOM processing daemon: receive studies, classify, return SRs.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"pacs-ai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def leaf(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        func: Callable[[argparse.Namespace], int],
        help_text: str,
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    leaf(sub, "serve", cmd_serve, "run the receiver, scheduler and worker pool")
    leaf(sub, "worker", cmd_worker, "run one worker loop (more hosts on a shared database)")
    p = leaf(sub, "status", cmd_status, "queue, spool and destinations at a glance")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-echo", action="store_true", help="skip the C-ECHO of destinations")
    p = leaf(
        sub,
        "conformance",
        cmd_conformance,
        "the SOP classes and transfer syntaxes the receiver accepts (Markdown)",
    )
    p.add_argument("--sop-classes", action="store_true", help="list every storage SOP class")
    p = leaf(sub, "echo", cmd_echo, "C-ECHO a destination (QIDO-RS probe for DICOMweb)")
    p.add_argument("name")

    jobs = sub.add_parser("jobs", help="inspect and steer jobs").add_subparsers(
        dest="jobs_command", required=True, metavar="ACTION"
    )
    p = leaf(jobs, "list", cmd_jobs_list, "list jobs")
    p.add_argument("--state", choices=[str(s) for s in JobState])
    p.add_argument("--kind")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p = leaf(jobs, "show", cmd_jobs_show, "one job with its results and dispatches")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    leaf(jobs, "retry", cmd_jobs_retry, "queue a dead or cancelled job again").add_argument(
        "id", type=int
    )
    leaf(jobs, "cancel", cmd_jobs_cancel, "cancel a job").add_argument("id", type=int)

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    leaf(audit, "verify", cmd_audit_verify, "check the audit hash chain row by row")

    results = sub.add_parser("results", help="model results").add_subparsers(
        dest="results_command", required=True, metavar="ACTION"
    )
    p = leaf(results, "compare", cmd_results_compare, "agreement of two models' results")
    p.add_argument("model_a", metavar="MODEL_A")
    p.add_argument("model_b", metavar="MODEL_B")
    p.add_argument("--json", action="store_true")

    p = leaf(sub, "replay", cmd_replay, "analyse a spooled study again; its SR supersedes")
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--model", metavar="NAME", default=None, help="only this model")

    reports = sub.add_parser("reports", help="reports and their delivery").add_subparsers(
        dest="reports_command", required=True, metavar="ACTION"
    )
    p = leaf(
        reports,
        "send",
        cmd_reports_send,
        "send a study's reports (or those written since a date) to a destination, "
        "through the outbox and its retries",
    )
    p.add_argument("--to", required=True, metavar="NAME", help="a [[destinations]] name")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="one study's latest reports")
    which.add_argument(
        "--since", metavar="DATE", type=_utc_date, help="every study reported since (UTC)"
    )

    db = sub.add_parser("db", help="database maintenance").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    leaf(db, "upgrade", cmd_db_upgrade, "apply database migrations")

    http = sub.add_parser("http", help="the HTTP server").add_subparsers(
        dest="http_command", required=True, metavar="ACTION"
    )
    p = leaf(http, "token", cmd_http_token, "make a bearer token and its [[http.tokens]] entry")
    p.add_argument("name", help="who uses it (1-16 of A-Z a-z 0-9 _ . -)")
    p.add_argument("--role", choices=["store", "read", "operator"], required=True)
    p = leaf(
        http,
        "user",
        cmd_http_user,
        "make a console user's [[http.users]] entry (the password from the terminal or stdin)",
    )
    p.add_argument("name", help="the login name (1-64 of A-Z a-z 0-9 _ . @ -)")
    p.add_argument("--role", choices=["read", "operator"], required=True)
    p = leaf(http, "console", cmd_http_console, "where the operator console is and who logs in")
    p.add_argument(
        "--password-file", type=Path, default=None, help="admin's first password (make run's)"
    )

    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="ACTION"
    )
    leaf(config, "check", cmd_config_check, "validate and print the effective configuration")

    models = sub.add_parser("models", help="classifier models").add_subparsers(
        dest="models_command", required=True, metavar="ACTION"
    )
    p = leaf(models, "list", cmd_models_list, "list the models under [models] dir")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    p = leaf(models, "train", cmd_models_train, "train a CNN or LSTM from DICOM and labels")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--kind", choices=["cnn", "lstm"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cnn", type=Path, default=None, help="the CNN folder an LSTM builds on")
    p.add_argument("--epochs", type=int, default=None)
    p = leaf(models, "demo", cmd_models_demo, "generate the synthetic demo data and models")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="a tiny demo that trains in seconds")
    p = leaf(models, "check", cmd_models_check,
             "load a model folder as a worker will and try it (exit 1: fails on the study, "
             "2: the folder is wrong)")
    p.add_argument("dir", nargs="?", type=Path, default=None, metavar="DIR",
                   help="a model folder or a models directory (default: [models] dir)")
    p.add_argument("--study", type=Path, default=None, metavar="PATH",
                   help="DICOM files (a file or a folder) to run the models on")
    p = leaf(models, "import", cmd_models_import,
             "make a model folder from a .keras or .onnx file, with a manifest to edit")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--format", choices=["keras", "onnx"], default=None,
                   help="default: from the file's suffix")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level or "info"
    setup_logging(level)
    if level != "debug":
        # TensorFlow's C++ start-up chatter is not for operators; workers inherit this.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # inside the try: a reader that went away is seen here
        return code
    except BrokenPipeError:
        return _closed_stdout()
    except (DatabaseMissing, DatabaseNotAtHead) as exc:
        _report(level, f"{exc}: {_upgrade_hint(args, exc)}")
        return EXIT_FAILURE
    except ConfigError as exc:
        _report(level, f"configuration error: {exc}")
        return EXIT_USAGE
    except CommandFailed as exc:
        _report(level, str(exc))
        return EXIT_FAILURE
    except SQLAlchemyError as exc:
        _report(level, f"database error: {_first_line(exc)}")
        return EXIT_FAILURE
    except OSError as exc:
        _report(level, f"error: {exc}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _upgrade_hint(args: argparse.Namespace, exc: Exception) -> str:
    """The command that makes the database usable, with the configuration as it was given."""
    command = "pacs-ai db upgrade" + (f" --config {args.config}" if args.config else "")
    if isinstance(exc, DatabaseMissing):
        return f"check storage.database_url, or create it with `{command}`"
    return f"run `{command}`"


def _closed_stdout() -> int:
    """The reader went away (`pacs-ai jobs list | head`): stop quietly, as other tools do.

    Python would report the broken pipe again when it flushes stdout at exit, so stdout is
    pointed at /dev/null first.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def _report(level: str, line: str) -> None:
    if level == "debug":
        log.exception(line)
    else:
        print(f"pacs-ai: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
