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
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
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


class Destination(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    verify: Literal["none", "find", "commitment"] = "none"
    tls: TLSSettings | None = None


class MetricsSettings(_Section):
    bind: str = "127.0.0.1"
    port: Annotated[int, AfterValidator(_check_metrics_port)] = 9110


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
    destinations: list[Destination] = Field(default_factory=list)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, destinations: list[Destination]) -> list[Destination]:
        names = [d.name for d in destinations]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"destination name {name!r} is used twice")
        return destinations

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

    def destination(self, name: str) -> Destination:
        """The destination called `name`, or ConfigError naming the known ones."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"destinations: no destination named {name!r} ({known})")


def _format_error(err: ValidationError) -> str:
    """The first problem as `field: problem`; an unknown key first, since a misspelt key
    is what makes the key it was meant to be "required"."""
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(part) for part in first["loc"]) or "config"
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
                    loc = ".".join(str(part) for part in (section, *error["loc"]))
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
        if section == "destinations":
            for dest in value:
                lines.append("\n[[destinations]]")
                lines.extend(_toml_pairs(dest, {}))
        elif isinstance(value, dict):
            lines.append(f"\n[{section}]")
            explained = {"early_seconds": _early_line(settings.assembly)}
            lines.extend(_toml_pairs(value, explained if section == "assembly" else {}))
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
