"""One typed settings object, read once at start from a TOML file and PACSAI_* variables."""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

CONFIG_ENV = "PACSAI_CONFIG"
# Read when neither --config nor $PACSAI_CONFIG names a file, if it exists (as the unit does).
DEFAULT_CONFIG = Path("/etc/pacs-ai/pacs-ai.toml")
# The environment load_settings was handed; None means os.environ.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("pacsai_environ", default=None)


class ConfigError(Exception):
    """A configuration problem, worded as `field: problem` for one log line."""


def _check_ae_title(value: str) -> str:
    """AE titles are at most 16 characters of the DICOM default repertoire, not blank."""
    if not value.strip():
        raise ValueError("AE title must not be blank")
    if len(value) > 16:
        raise ValueError("AE title must be 1-16 characters")
    if "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("AE title must not contain a backslash or control characters")
    return value.strip()


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be between 1 and 65535")
    return value


def _check_metrics_port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 (off) and 65535")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, AfterValidator(_check_port)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Section):
    """Certificate, key and CA bundle for DICOM over TLS (both ways when `ca` is set)."""

    certificate: Path
    key: Path
    ca: Path | None = None


class DicomSettings(_Section):
    ae_title: AETitle = "PACSAI"
    bind: str = "0.0.0.0"
    port: Port = 11112
    allowed_callers: list[AETitle] = Field(default_factory=list)
    max_associations: int = Field(default=16, ge=1, le=1000)
    processes: int = Field(default=1, ge=1, le=64)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    max_pdu: int = Field(default=262144, ge=0)
    drain_seconds: float = Field(default=30.0, ge=0)
    tls: TLSSettings | None = None


class StorageSettings(_Section):
    spool_dir: Path = Path("/var/lib/pacs-ai/spool")
    database_url: str | None = None
    min_free_mb: int = Field(default=1024, ge=0)
    # Days after every destination confirmed a study's latest SR before its instance files
    # are purged from the spool (the rows stay); 0 keeps them forever.
    retention_days: float = Field(default=0, ge=0)

    @property
    def effective_database_url(self) -> str:
        """The configured URL, or SQLite beside the spool."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.spool_dir.parent.absolute() / 'pacs-ai.db'}"


DEFAULT_EARLY_SECONDS = 0.5


class AssemblySettings(_Section):
    quiet_seconds: float = Field(default=30.0, ge=0)
    sweep_seconds: float = Field(default=60.0, gt=0)
    # After this much quiet (less than quiet_seconds; 0 = never) the models start on what
    # has arrived, so that once the study is quiet little is left to do. Unset: the default,
    # where the quiet window is longer than it.
    early_seconds: float | None = Field(default=None, ge=0)
    # A study whose every series holds what its images declare closes after this pause
    # instead of the quiet window (0 = never; only in force when shorter than quiet_seconds).
    evidence_seconds: float = Field(default=2.0, ge=0)
    # An MPPS step whose study never arrives (or never completes) is dropped after this.
    mpps_expire_hours: float = Field(default=24.0, gt=0)

    @field_validator("early_seconds")
    @classmethod
    def _early_before_quiet(cls, value: float | None, info: ValidationInfo) -> float | None:
        quiet = info.data.get("quiet_seconds")
        if value and quiet is not None and value >= quiet:
            raise ValueError("must be less than quiet_seconds (0 turns early analysis off)")
        return value

    @property
    def early_analysis_seconds(self) -> float | None:
        """The early window in force: None when off, or when the quiet window is shorter."""
        early = DEFAULT_EARLY_SECONDS if self.early_seconds is None else self.early_seconds
        return early if 0 < early < self.quiet_seconds else None


class WorkerSettings(_Section):
    count: int = Field(default=1, ge=0, le=64)
    lease_seconds: float = Field(default=120.0, gt=0)
    poll_seconds: float = Field(default=0.2, gt=0)
    # Added to the workers' nice value: senders wait on the receiver's answers, nobody waits
    # on a worker by the millisecond, so analysis yields the CPU when both want it.
    nice: int = Field(default=10, ge=0, le=19)


class ModelSettings(_Section):
    dir: Path = Path("/var/lib/pacs-ai/models")
    # Models run in shadow mode: results recorded, nothing of them sent (as manifest shadow).
    shadow: list[str] = Field(default_factory=list)
    # Where ONNX models run: "gpu" takes onnxruntime's CUDA provider where installed.
    device: Literal["cpu", "gpu"] = "cpu"


class RetrySettings(_Section):
    """Backoff for failed jobs: first wait, growth, cap and attempt budget."""

    base_seconds: float = Field(default=30.0, gt=0)
    factor: float = Field(default=2.0, ge=1)
    cap_seconds: float = Field(default=3600.0, gt=0)
    max_attempts: int = Field(default=24, ge=1)
    jitter: float = Field(default=0.1, ge=0, le=1)


class ReportSettings(_Section):
    """What the report stage produces."""

    no_model_sr: bool = True
    series_number: int = Field(default=7701, ge=1, le=2**31 - 1)
    heatmap_top_k: int = Field(default=3, ge=0, le=100)


DestinationName = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]


class Destination(_Section):
    """A DIMSE peer: reports go by C-STORE (the default kind)."""

    kind: Literal["dimse"] = "dimse"
    name: DestinationName
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    verify: Literal["none", "find", "commitment"] = "none"
    tls: TLSSettings | None = None


class Source(_Section):
    """A modality that sends us studies: accepted as a caller, and where Storage Commitment
    reports go when it does not wait for them on its own association."""

    name: DestinationName
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    tls: TLSSettings | None = None


class HttpClientTLS(_Section):
    """A client certificate (mutual TLS) and/or the CA bundle that checks the server."""

    certificate: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @model_validator(mode="after")
    def _certificate_with_key(self) -> HttpClientTLS:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("certificate and key go together")
        return self


def _check_http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value) < len("http://x"):
        raise ValueError("must be an http:// or https:// URL (the archive's DICOMweb root)")
    return value.rstrip("/")


class DicomWebDestination(_Section):
    """A DICOMweb archive: reports go by STOW-RS, confirmed by QIDO-RS when asked."""

    kind: Literal["dicomweb"]
    name: DestinationName
    url: Annotated[str, AfterValidator(_check_http_url)]
    # Sent as `Authorization: Bearer`; printed as ********** by `config check`.
    token: SecretStr | None = None
    verify: Literal["none", "qido"] = "none"
    tls: HttpClientTLS | None = None


def _destination_kind(value: Any) -> str:
    """Which destination class a table is: its `kind`, DIMSE when unset."""
    if isinstance(value, dict):
        return str(value.get("kind", "dimse"))
    return str(getattr(value, "kind", "dimse"))


AnyDestination = Annotated[
    Annotated[Destination, Tag("dimse")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(
        _destination_kind,
        custom_error_type="destination_kind",
        custom_error_message="kind must be 'dimse' or 'dicomweb'",
    ),
]


class MetricsSettings(_Section):
    bind: str = "127.0.0.1"
    port: Annotated[int, AfterValidator(_check_metrics_port)] = 9110


HttpRole = Literal["store", "read", "operator"]


class HttpToken(_Section):
    """A bearer token, known by its sha256 only (`pacs-ai http token` makes one)."""

    name: str = Field(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9_.-]+$")
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$"), AfterValidator(str.lower)]
    role: HttpRole


def _check_argon2_hash(value: str) -> str:
    from argon2 import extract_parameters
    from argon2.exceptions import InvalidHashError

    try:
        extract_parameters(value)
    except InvalidHashError as exc:
        raise ValueError("not an argon2 hash (`pacs-ai http user` makes one)") from exc
    return value


class HttpUser(_Section):
    """A console user: name, argon2 password hash (`pacs-ai http user` makes one), role."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    password_hash: Annotated[str, AfterValidator(_check_argon2_hash)]
    role: Literal["read", "operator"]


class HttpTLSSettings(_Section):
    """HTTPS for the HTTP server; with `ca`, client certificates it signed authenticate."""

    certificate: Path
    key: Path
    ca: Path | None = None
    # The role of a client that presents a certificate signed by `ca` (mutual TLS).
    client_role: HttpRole | None = None

    @model_validator(mode="after")
    def _client_role_needs_ca(self) -> HttpTLSSettings:
        if self.client_role is not None and self.ca is None:
            raise ValueError("client_role needs ca (the CA that signs client certificates)")
        return self


class HttpSettings(_Section):
    """The HTTP server of `serve`: DICOMweb, /metrics and health (port 0: off)."""

    bind: str = "0.0.0.0"
    port: Annotated[int, AfterValidator(_check_metrics_port)] = 0
    tls: HttpTLSSettings | None = None
    max_body_mb: int = Field(default=4096, ge=1)
    # The request line and headers must arrive within this many seconds.
    header_timeout: float = Field(default=10.0, gt=0)
    # The body may pause at most this long, and must keep up `body_min_rate_kb` KiB/s
    # after this many seconds (a client sending one byte a second is cut off).
    body_timeout: float = Field(default=30.0, gt=0)
    body_min_rate_kb: float = Field(default=64.0, ge=0)
    keepalive_timeout: float = Field(default=5.0, gt=0)
    # Roles any client gets without credentials (warned at start); operator never.
    anonymous: list[Literal["store", "read"]] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)
    tokens: list[HttpToken] = Field(default_factory=list)
    # The operator console: who may sign in, for how long, and whether it shows patients.
    users: list[HttpUser] = Field(default_factory=list)
    session_minutes: float = Field(default=480.0, gt=0, le=7 * 24 * 60)
    show_patient_data: bool = False

    @field_validator("tokens")
    @classmethod
    def _unique_tokens(cls, tokens: list[HttpToken]) -> list[HttpToken]:
        for field in ("name", "sha256"):
            values = [getattr(t, field) for t in tokens]
            for value in values:
                if values.count(value) > 1:
                    raise ValueError(f"token {field} {value[:16]!r} is used twice")
        return tokens

    @field_validator("users")
    @classmethod
    def _unique_users(cls, users: list[HttpUser]) -> list[HttpUser]:
        names = [u.name for u in users]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"user name {name!r} is used twice")
        return users


class _MappingEnvSource(EnvSettingsSource):
    """PACSAI_* variables read from a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        if self.case_sensitive:
            return dict(self._environ)
        return {k.lower(): v for k, v in self._environ.items()}


class Settings(BaseSettings):
    """Everything the daemon can be told; built once and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="PACSAI_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    report: ReportSettings = Field(default_factory=ReportSettings)
    destinations: list[AnyDestination] = Field(default_factory=list)
    sources: list[Source] = Field(default_factory=list)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(
        cls, destinations: list[Destination | DicomWebDestination]
    ) -> list[Destination | DicomWebDestination]:
        names = [d.name for d in destinations]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"destination name {name!r} is used twice")
        return destinations

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, sources: list[Source]) -> list[Source]:
        for key in ("name", "ae_title"):
            values = [getattr(s, key) for s in sources]
            for value in values:
                if values.count(value) > 1:
                    raise ValueError(f"source {key} {value!r} is used twice")
        return sources

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first so PACSAI_* overrides what the file says.
        environ = _ENVIRON.get()
        if environ is not None:
            env_settings = _MappingEnvSource(settings_cls, environ)
        return (env_settings, init_settings)

    def destination(self, name: str) -> Destination | DicomWebDestination:
        """The destination called `name`, or ConfigError naming the known ones."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"destinations: no destination named {name!r} ({known})")

    def source_for(self, ae_title: str) -> Source | None:
        """The `[[sources]]` entry of a calling AE title, or None."""
        return next((s for s in self.sources if s.ae_title == ae_title.strip()), None)

    @property
    def accepted_callers(self) -> list[str]:
        """Calling AE titles the receiver accepts: `allowed_callers` and every source's
        (empty, as `allowed_callers` alone, means any caller)."""
        callers = self.dicom.allowed_callers
        if not callers:
            return []
        return list(dict.fromkeys([*callers, *(s.ae_title for s in self.sources)]))


# Tags pydantic adds to an error's location inside a destination (which kind it tried).
_DESTINATION_TAGS = {"dimse": Destination, "dicomweb": DicomWebDestination}


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    """An error's location as the file names it: `destinations.0.port`, without the tag of
    the destination kind pydantic tried."""
    parts = list(loc)
    if parts[:1] == ["destinations"] and len(parts) > 2 and parts[2] in _DESTINATION_TAGS:
        del parts[2]
    return ".".join(str(part) for part in parts) or "config"


def _format_error(err: ValidationError) -> str:
    """The first problem as `field: problem`; an unknown key first, since a misspelt key
    is what makes the key it was meant to be "required"."""
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = _location(first["loc"])
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(first["loc"])
    return f"{loc}: {msg}"


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """` (did you mean ae_title?)` for a key close to one its table knows, else empty."""
    model: Any = Settings
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if loc[:1] == ("destinations",) and part in _DESTINATION_TAGS:
            model = _DESTINATION_TAGS[part]
            continue
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            return ""
        model = _model_in(field.annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _model_in(annotation: Any) -> Any:
    """The model class inside `Model`, `Model | None` or `list[Model]`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# A TOML value of the wrong kind: refused as written, even where pydantic could convert it
# (`port = "4343"`). Environment variables are text, so only the file is held to this.
_TOML_KINDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
}
_PYTHON_TO_TOML = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
                   list: "an array", dict: "a table"}


def _check_file_types(data: dict[str, Any]) -> None:
    """Raise ConfigError for the first value in the file whose TOML type is not the field's."""
    for section, value in data.items():
        field = Settings.model_fields.get(section)
        if field is None:
            continue  # the model reports the unknown key
        try:
            TypeAdapter(field.annotation).validate_python(value, strict=True)
        except ValidationError as exc:
            for error in exc.errors():
                if error["type"] in _TOML_KINDS:
                    loc = _location((section, *error["loc"]))
                    given = _PYTHON_TO_TOML.get(type(error["input"]), "something else")
                    raise ConfigError(
                        f"{loc}: must be {_TOML_KINDS[error['type']]}, not {given} "
                        f"({json.dumps(error['input'], default=str)})"
                    ) from exc


def read_toml(path: Path) -> dict[str, Any]:
    """The file's table, with a one-line error naming the file and line on bad TOML."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except PermissionError as exc:
        raise ConfigError(f"{path}: permission denied") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def config_file(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    default: Path = DEFAULT_CONFIG,
) -> Path | None:
    """The file to read: `path`, else $PACSAI_CONFIG, else `default` if it exists, else none."""
    env = os.environ if environ is None else environ
    if path is not None:
        return path
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return default if default.is_file() else None


def load_settings(
    path: Path | None = None,
    environ: dict[str, str] | None = None,
    default: Path = DEFAULT_CONFIG,
) -> Settings:
    """Build the settings from `config_file(...)` (or defaults) plus the environment."""
    env = os.environ if environ is None else environ
    path = config_file(path, env, default)
    data = read_toml(path) if path is not None else {}
    _check_file_types(data)
    token = _ENVIRON.set(env)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from exc
    finally:
        _ENVIRON.reset(token)


def dump_settings(settings: Settings, source: Path | None = None) -> str:
    """The effective configuration as TOML-like text for `config check`; `source` is the
    file it was read from (None: defaults and environment only)."""
    data = settings.model_dump(mode="json")
    lines: list[str] = [
        f"# file: {source if source is not None else 'none (defaults and PACSAI_* only)'}",
        f"# database: {settings.storage.effective_database_url}",
    ]
    for section, value in data.items():
        if section in ("destinations", "sources"):
            for dest in value:
                lines.append(f"\n[[{section}]]")
                lines.extend(_toml_pairs(dest, {}))
        elif isinstance(value, dict):
            arrays = {k: value.pop(k, []) for k in ("tokens", "users")} if section == "http" else {}
            lines.append(f"\n[{section}]")
            explained = {"early_seconds": _early_line(settings.assembly)}
            lines.extend(_toml_pairs(value, explained if section == "assembly" else {}))
            for key, tables in arrays.items():
                for table in tables:
                    lines.append(f"\n[[{section}.{key}]]")
                    lines.extend(_toml_pairs(table, {}))
    return "\n".join(lines) + "\n"


def _early_line(assembly: AssemblySettings) -> str:
    """`early_seconds` as it takes effect, and why (it depends on quiet_seconds when unset)."""
    effective = assembly.early_analysis_seconds
    value = json.dumps(effective if effective is not None else 0)
    if assembly.early_seconds is None and effective is not None:
        why = f"not set: the default {DEFAULT_EARLY_SECONDS:g} s, shorter than quiet_seconds"
    elif assembly.early_seconds is None:
        why = (f"not set, and quiet_seconds ({assembly.quiet_seconds:g}) is not longer than "
               f"the default {DEFAULT_EARLY_SECONDS:g} s: early analysis off")
    elif effective is None:
        why = "early analysis off"
    else:
        why = "as set"
    return f"early_seconds = {value}  # {why}"


def _toml_pairs(table: dict[str, Any], explained: dict[str, str]) -> list[str]:
    """`key = value` lines; a key in `explained` gets that line instead."""
    out = []
    for key, val in table.items():
        if key in explained:
            out.append(explained[key])
        elif val is None:
            out.append(f"# {key} = (not set)")
        elif isinstance(val, dict):
            inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in val.items() if v is not None)
            out.append(f"{key} = {{ {inner} }}")
        else:
            out.append(f"{key} = {json.dumps(val)}")
    return out
