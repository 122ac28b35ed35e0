"""earshot's settings: one pydantic-settings model, read from (highest first) CLI flags, environment
variables (`EARSHOT_*`, then the Speaches seed names `SPEACHES_*`), `.env` in the working directory,
`config.yaml`, and defaults.

Nothing is read at import time: `load_settings()` does the reading, and records where each value
came from so `earshot config` and `GET /api/config` can show it, and so a bad value is reported
with the setting's name and its source in one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    CliSuppress,
    DotEnvSettingsSource,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from earshot.types import Task

ENV_PREFIX = "EARSHOT_"
SEED_PREFIX = "SPEACHES_"
# The Speaches configuration guide's variables, accepted unchanged as aliases of the EARSHOT_ names.
SEED_ALIASES: tuple[str, ...] = (
    "model_idle_timeout",
    "max_models",
    "model_load_timeout",
    "log_level",
    "base_url",
)
# config.yaml `model_management:` keys (the guide's shape) and the settings they set.
MODEL_MANAGEMENT_KEYS: Mapping[str, str] = {
    "idle_timeout": "model_idle_timeout",
    "max_models": "max_models",
    "preload_models": "preload_models",
    "load_timeout": "model_load_timeout",
    "memory_budget_bytes": "memory_budget_bytes",
    "pin_preloaded": "pin_preloaded",
}
SECRET_FIELDS = frozenset({"api_key"})


class SettingsError(Exception):
    """A setting could not be read or is invalid; the message is one line per problem."""


class ModelEntry(BaseModel):
    """A model declared in config.yaml `models:` (an explicit local path or a Hugging Face repo)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200)
    task: Task | None = None  # inferred from the files (local) or the repo name (hub) when absent
    path: Path | None = None
    repo: str | None = Field(
        default=None, description="Hugging Face repo id, e.g. Systran/faster-whisper-small"
    )
    revision: str | None = None
    pin: bool = False
    idle_timeout: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        if (self.path is None) == (self.repo is None):
            raise ValueError(f"model {self.id!r}: give exactly one of `path` or `repo`")
        if self.idle_timeout is not None and self.idle_timeout < 0 and self.idle_timeout != -1:
            raise ValueError(f"model {self.id!r}: idle_timeout must be -1 (never), 0 or a positive number")
        return self


def _split_list(value: Any) -> Any:
    """Accept a JSON list (`["a","b"]`, the guide's form) or a comma-separated string (`a,b`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of DESIGN §3. Field names are the config.yaml / CLI names (CLI in kebab-case)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    host: str = Field("127.0.0.1", description="Interface to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    base_url: str = Field(
        "http://localhost:8000", description="Where clients (and `earshot ps`) reach the server"
    )
    api_key: SecretStr | None = Field(
        None, description="When set, every route but /health and /metrics needs it"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level"
    )
    log_format: Literal["json", "console"] = Field("json", description="json lines, or console for humans")

    model_idle_timeout: float = Field(
        300,
        description="Seconds an unused model stays loaded; -1 never unloads, 0 unloads after each request",
    )
    max_models: int | None = Field(None, ge=1, description="Loaded models at most; unset: no limit")
    memory_budget_bytes: ByteSize | None = Field(
        None, gt=0, description="Sum of model footprints at most, e.g. 8GiB; unset: no limit"
    )
    model_load_timeout: float = Field(300, gt=0, description="Seconds a load (or a wait for room) may take")
    thrash_window_seconds: float = Field(
        300, ge=0, description="A load this soon after an eviction is a reload"
    )
    max_waiting_requests: int = Field(
        256, ge=0, description="Requests waiting in the cache at most; more get 503"
    )
    preload_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Model ids to load at start-up (JSON list or comma-separated)"
    )
    pin_preloaded: bool = Field(True, description="Preloaded models are exempt from idle eviction")
    shutdown_grace_seconds: float = Field(
        30, ge=0, description="Seconds shutdown waits for requests in flight"
    )

    models_dir: Path = Field(Path("models"), description="Directory of local models (one sub-directory each)")
    model_aliases_file: Path | None = Field(
        None,
        description="JSON file mapping public names (whisper-1, tts-1) to model ids; unset: the built-in one",
    )
    builtin_hub_models: bool = Field(
        True,
        description="List well-known Hugging Face models (Systran/faster-whisper-*, Kokoro) in the catalog",
    )
    allow_hub_models: bool = Field(
        True,
        description="Resolve a requested owner/name id the catalog does not list on the Hugging Face Hub "
        "(the HF cache offline)",
    )
    max_catalog_models: int = Field(
        32, ge=0, description="Hub ids added to the catalog on demand at most; more get 403"
    )
    model_download_timeout: float = Field(
        3600,
        gt=0,
        description="Seconds a model's first download may take (not counted in model_load_timeout)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run")
    compute_type: str = Field("auto", description="CTranslate2 compute type (auto, int8, float16, ...)")
    cpu_threads: int = Field(
        0, ge=0, description="Threads per faster-whisper model on CPU (0: library default)"
    )
    inference_concurrency: int = Field(1, ge=1, description="Inferences at once per model")

    max_upload_bytes: ByteSize = Field(
        ByteSize(100 * 1024 * 1024), description="Largest accepted audio upload (413 above)"
    )
    max_audio_seconds: float = Field(7200, gt=0, description="Longest accepted decoded audio, in seconds")
    max_input_chars: int = Field(4096, ge=1, description="Longest accepted text for speech")
    max_header_bytes: ByteSize = Field(
        ByteSize(64 * 1024),
        description="Largest accepted request head (request line and headers together; 431 above)",
    )
    max_headers: int = Field(100, ge=1, description="Most headers accepted in one request (431 above)")
    decode_workers: int = Field(
        2, ge=1, description="Audio decode processes: decodes at once (more wait; a crash costs one worker)"
    )
    decode_memory_bytes: ByteSize = Field(
        ByteSize(2 * 1024**3),
        description="Memory one decode process may take beyond its start-up size (a decode over it is 400)",
    )

    max_realtime_sessions: int = Field(
        16,
        ge=0,
        description="Realtime (WebSocket) transcription sessions open at once at most; more are closed at once",
    )
    realtime_idle_timeout: float = Field(
        300, gt=0, description="Seconds a realtime session may send nothing before it is closed"
    )
    realtime_max_buffer_seconds: float = Field(
        60,
        gt=0,
        description="Seconds of uncommitted audio a realtime session may buffer (a longer turn is cut)",
    )

    nvml_interval_seconds: float = Field(5, gt=0, description="Seconds between GPU samples")
    events_buffer_size: int = Field(1000, ge=1, description="Cache events kept for /api/events")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint, e.g. http://localhost:4318/v1/traces; unset: no export"
    )

    ray_address: str | None = Field(
        None,
        description="Fleet: the Ray cluster to join (`auto`, or an address such as 10.0.0.1:6379); unset: start a local Ray on 127.0.0.1",
    )
    fleet_workers: int = Field(2, ge=1, description="Fleet: worker replicas (when autoscaling is not set)")
    fleet_min_workers: int | None = Field(
        None,
        ge=0,
        description="Fleet: autoscaling on ongoing requests, fewest workers (with fleet_max_workers)",
    )
    fleet_max_workers: int | None = Field(
        None,
        ge=1,
        description="Fleet: autoscaling on ongoing requests, most workers (with fleet_min_workers)",
    )
    fleet_models_per_worker: int = Field(
        2, ge=1, description="Fleet: models one worker holds at most (its max_models and Ray's multiplexing)"
    )
    fleet_cpus_per_worker: float = Field(1, gt=0, description="Fleet: CPUs Ray reserves for each worker")
    fleet_gpus_per_worker: float = Field(
        0, ge=0, description="Fleet: GPUs Ray reserves for each worker (1: N GPUs give N workers)"
    )

    models: CliSuppress[list[ModelEntry]] = Field(
        default_factory=list, description="Models declared in config.yaml (`models:`)"
    )

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("model_idle_timeout")
    @classmethod
    def _idle_timeout(cls, value: float) -> float:
        if value < 0 and value != -1:
            raise ValueError("must be -1 (never unload), 0 (unload after each request) or a positive number")
        return value

    @model_validator(mode="after")
    def _fleet_scale(self) -> Settings:
        lo, hi = self.fleet_min_workers, self.fleet_max_workers
        if (lo is None) != (hi is None):
            raise ValueError("fleet_min_workers and fleet_max_workers go together: set both, or neither")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"fleet_min_workers ({lo}) is above fleet_max_workers ({hi})")
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("preload_models", mode="before")
    @classmethod
    def _preload_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("otlp_endpoint", "api_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        options = _LOAD_OPTIONS.get()
        if options is None:  # plain Settings(): defaults and explicit arguments only, nothing read
            return (init_settings,)
        return tuple(source for _, source in _named_sources(settings_cls, init_settings, options))

    @property
    def sources(self) -> Mapping[str, str]:
        """Where each setting's value came from ("default" when nothing set it)."""
        return {name: self._sources.get(name, "default") for name in type(self).model_fields}

    def effective(self) -> dict[str, dict[str, Any]]:
        """Every setting's effective value (secrets redacted) and its source, for display."""
        data = self.model_dump(mode="json")
        out: dict[str, dict[str, Any]] = {}
        for name, value in data.items():
            if name in SECRET_FIELDS and value is not None:
                value = "**********"
            out[name] = {"value": value, "source": self.sources[name]}
        return out


@dataclass(frozen=True)
class _LoadOptions:
    config_file: Path | None
    env_file: Path | None
    environ: Mapping[str, str] | None = None
    cli_flags: Mapping[str, str] = field(default_factory=dict)  # field name -> flag as typed


_LOAD_OPTIONS: ContextVar[_LoadOptions | None] = ContextVar("earshot_settings_load", default=None)


class _ModelManagementYamlSource(YamlConfigSettingsSource):
    """config.yaml: top-level settings by name, the guide's `model_management:` block, and `models:`."""

    yaml_keys: dict[str, str]

    def _read_file(self, file_path: Path | Any) -> dict[str, Any]:
        if not hasattr(self, "yaml_keys"):
            self.yaml_keys = {}
        data = super()._read_file(file_path)
        if not isinstance(data, dict):
            raise SettingsError(f"config file {file_path}: the top level must be a mapping of settings")
        block = data.pop("model_management", None) or {}
        if not isinstance(block, dict):
            raise SettingsError(f"config file {file_path}: `model_management` must be a mapping")
        for key, value in block.items():
            target = MODEL_MANAGEMENT_KEYS.get(key)
            if target is None:
                known = ", ".join(MODEL_MANAGEMENT_KEYS)
                raise SettingsError(
                    f"config file {file_path}: unknown key model_management.{key} (known keys: {known})"
                )
            if target in data:
                raise SettingsError(
                    f"config file {file_path}: {target} is set twice (top level and model_management.{key})"
                )
            data[target] = value
            self.yaml_keys[target] = f"model_management.{key}"
        return data


class _EnvSource(EnvSettingsSource):
    """EnvSettingsSource over os.environ or an explicit mapping, optionally limited to some settings
    (the Speaches seed names cover only five)."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        *,
        env_prefix: str,
        environ: Mapping[str, str] | None = None,
        only: frozenset[str] | None = None,
    ) -> None:
        self._environ = None if environ is None else dict(environ)
        self._only = only
        super().__init__(settings_cls, env_prefix=env_prefix)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        if self._environ is None:
            return super()._load_env_vars()
        return {k.lower(): v for k, v in self._environ.items()}

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        return values if self._only is None else {k: v for k, v in values.items() if k in self._only}


class _DotEnvSource(DotEnvSettingsSource):
    """`.env` in the working directory. Other programs' variables in it are ignored; an unknown
    variable with our prefix is a typo and is reported (as an unknown setting)."""

    def __init__(
        self, settings_cls: type[BaseSettings], *, env_file: Path, env_prefix: str, only: frozenset[str]
    ) -> None:
        self._only = only
        super().__init__(settings_cls, env_file=env_file, env_prefix=env_prefix)

    def __call__(self) -> dict[str, Any]:
        prefix = (self.env_prefix or "").lower()
        out: dict[str, Any] = {}
        for key, value in super().__call__().items():
            if key in self._only:
                out[key] = value
            elif key.lower().startswith(prefix) and prefix == ENV_PREFIX.lower():
                out[key[len(prefix) :]] = value  # unknown EARSHOT_ name: let validation name it
        return out


def _named_sources(
    settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, options: _LoadOptions
) -> list[tuple[str, PydanticBaseSettingsSource]]:
    """The sources, highest priority first, each with the name shown for the values it supplies."""
    sources: list[tuple[str, PydanticBaseSettingsSource]] = [
        ("cli", init_settings),
        ("env", _EnvSource(settings_cls, env_prefix=ENV_PREFIX, environ=options.environ)),
        (
            "seed-env",
            _EnvSource(
                settings_cls, env_prefix=SEED_PREFIX, environ=options.environ, only=frozenset(SEED_ALIASES)
            ),
        ),
    ]
    if options.env_file is not None and options.env_file.is_file():
        env_file = options.env_file
        fields = frozenset(settings_cls.model_fields)
        seed = frozenset(SEED_ALIASES)
        sources.append(
            ("dotenv", _DotEnvSource(settings_cls, env_file=env_file, env_prefix=ENV_PREFIX, only=fields))
        )
        sources.append(
            ("seed-dotenv", _DotEnvSource(settings_cls, env_file=env_file, env_prefix=SEED_PREFIX, only=seed))
        )
    if options.config_file is not None:
        sources.append(("config", _ModelManagementYamlSource(settings_cls, yaml_file=options.config_file)))
    return sources


def _describe(kind: str, name: str, options: _LoadOptions, source: PydanticBaseSettingsSource) -> str:
    """Human description of where `name` was set, e.g. 'environment variable SPEACHES_MAX_MODELS'."""
    if kind == "cli":
        return f"command-line flag {options.cli_flags.get(name, '--' + name.replace('_', '-'))}"
    if kind == "env":
        return f"environment variable {ENV_PREFIX}{name.upper()}"
    if kind == "seed-env":
        return f"environment variable {SEED_PREFIX}{name.upper()}"
    if kind == "dotenv":
        return f"{options.env_file} ({ENV_PREFIX}{name.upper()})"
    if kind == "seed-dotenv":
        return f"{options.env_file} ({SEED_PREFIX}{name.upper()})"
    if kind == "config":
        key = getattr(source, "yaml_keys", {}).get(name, name)
        return f"config file {options.config_file} (key {key})"
    return kind


def config_path_from(environ: Mapping[str, str], explicit: str | Path | None = None) -> Path | None:
    """`--config` wins, then EARSHOT_CONFIG; otherwise no config file."""
    if explicit:
        return Path(explicit)
    value = environ.get("EARSHOT_CONFIG")
    return Path(value) if value else None


def load_settings(
    cli: Mapping[str, Any] | None = None,
    *,
    config_file: str | Path | None = None,
    env_file: str | Path | None = ".env",
    environ: Mapping[str, str] | None = None,
    cli_flags: Mapping[str, str] | None = None,
) -> Settings:
    """Read the settings from every source. Raises SettingsError with one line per bad value.

    cli: values from command-line flags, by field name (highest priority).
    config_file: config.yaml path; default from EARSHOT_CONFIG.
    environ: the environment to read (default os.environ).
    cli_flags: for messages, the flag each cli value was given as (e.g. {"max_models": "--max-models"}).
    """
    env = os.environ if environ is None else environ
    config = config_path_from(env, config_file)
    if config is not None and not config.is_file():
        raise SettingsError(
            f"config file {config} does not exist (from {'--config' if config_file else 'EARSHOT_CONFIG'})"
        )
    options = _LoadOptions(
        config_file=config,
        env_file=Path(env_file) if env_file else None,
        environ=environ,
        cli_flags=dict(cli_flags or {}),
    )
    cli_values = {k: v for k, v in (cli or {}).items() if v is not None}
    token = _LOAD_OPTIONS.set(options)
    try:
        try:
            settings = Settings(**cli_values)
        except ValidationError as exc:
            raise SettingsError(_explain(exc, cli_values, options)) from None
        except SettingsError:
            raise
        except (ValueError, OSError) as exc:  # unreadable YAML/JSON in a source
            raise SettingsError(f"could not read the settings: {exc}") from None
        settings._sources = _attribute(cli_values, options)
    finally:
        _LOAD_OPTIONS.reset(token)
    return settings


def _attribute(cli_values: Mapping[str, Any], options: _LoadOptions) -> dict[str, str]:
    """For each setting some source supplies, the description of the highest-priority such source."""
    from pydantic_settings import InitSettingsSource

    found: dict[str, str] = {}
    init = InitSettingsSource(Settings, dict(cli_values))
    for kind, source in _named_sources(Settings, init, options):
        try:
            values = source()
        except Exception:  # noqa: S112 - it already failed loudly in Settings(); attribution is best effort
            continue
        for name in values:
            found.setdefault(name, _describe(kind, name, options, source))
    return found


def _explain(exc: ValidationError, cli_values: Mapping[str, Any], options: _LoadOptions) -> str:
    attribution = _attribute(cli_values, options)
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        name = loc[0] if loc else "?"
        where = attribution.get(name, "default")
        shown = ".".join(loc)
        msg = error["msg"]
        if not loc:  # a rule across settings (a model validator): its message names them
            lines.append(f"invalid settings: {msg.removeprefix('Value error, ')}")
            continue
        if error["type"] == "extra_forbidden":
            lines.append(f"unknown setting {shown!r} (from {where})")
            continue
        value = error.get("input")
        value_text = "" if isinstance(value, dict | list) or name in SECRET_FIELDS else f"={value!r}"
        lines.append(f"invalid setting {shown}{value_text} (from {where}): {msg}")
    return "\n".join(lines)


def cli_flag_names() -> Sequence[str]:
    """Settings that have a command-line flag (all but `models`)."""
    return [n for n in Settings.model_fields if n != "models"]
