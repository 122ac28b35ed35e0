"""Settings: every source, their order, the Speaches seed aliases, and the message for each bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from earshot.settings import SEED_ALIASES, Settings, SettingsError, load_settings


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, with no EARSHOT_/SPEACHES_ variables from the outer environment."""
    monkeypatch.chdir(tmp_path)
    import os

    for name in list(os.environ):
        if name.startswith(("EARSHOT_", "SPEACHES_")):
            monkeypatch.delenv(name)
    return tmp_path


def test_defaults_match_the_design(cwd: Path) -> None:
    s = load_settings(environ={})
    assert s.model_idle_timeout == 300
    assert s.max_models is None
    assert s.model_load_timeout == 300
    assert s.log_level == "INFO"
    assert s.base_url == "http://localhost:8000"
    assert s.preload_models == []
    assert s.thrash_window_seconds == 300
    assert s.max_waiting_requests == 256
    assert s.max_upload_bytes == 100 * 1024 * 1024
    assert s.pin_preloaded is True
    assert s.device == "auto"
    assert all(source == "default" for source in s.sources.values())


def test_plain_constructor_reads_nothing(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No settings are read at import or construction time, only by load_settings()."""
    monkeypatch.setenv("EARSHOT_MAX_MODELS", "7")
    write(cwd / ".env", "EARSHOT_PORT=9999\n")
    s = Settings()
    assert s.max_models is None
    assert s.port == 8000


def test_order_cli_over_env_over_dotenv_over_yaml_over_default(cwd: Path) -> None:
    config = write(
        cwd / "config.yaml",
        "model_management:\n  idle_timeout: 11\n  max_models: 11\n  preload_models: [a]\n"
        "port: 1111\nhost: 0.0.0.0\nlog_format: console\n",
    )
    write(cwd / ".env", "EARSHOT_MAX_MODELS=22\nEARSHOT_PORT=2222\nEARSHOT_HOST=10.0.0.2\n")
    environ = {"EARSHOT_PORT": "3333", "EARSHOT_MODEL_IDLE_TIMEOUT": "33"}
    s = load_settings({"port": "4444"}, config_file=config, environ=environ)
    assert s.port == 4444  # cli beats env, dotenv, yaml
    assert s.model_idle_timeout == 33  # env beats yaml
    assert s.max_models == 22  # .env beats yaml
    assert s.host == "10.0.0.2"  # .env beats yaml
    assert s.log_format == "console"  # yaml beats default
    assert s.preload_models == ["a"]
    assert s.model_load_timeout == 300  # default
    src = s.sources
    assert src["port"] == "command-line flag --port"
    assert src["model_idle_timeout"] == "environment variable EARSHOT_MODEL_IDLE_TIMEOUT"
    assert src["max_models"].endswith("(EARSHOT_MAX_MODELS)")
    assert ".env" in src["max_models"]
    assert src["log_format"] == f"config file {config} (key log_format)"
    assert src["preload_models"] == f"config file {config} (key model_management.preload_models)"
    assert src["model_load_timeout"] == "default"


@pytest.mark.parametrize("name", SEED_ALIASES)
def test_each_seed_alias_sets_its_setting(cwd: Path, name: str) -> None:
    values = {
        "model_idle_timeout": ("21600", 21600.0),
        "max_models": ("3", 3),
        "model_load_timeout": ("42", 42.0),
        "log_level": ("debug", "DEBUG"),
        "base_url": ("http://speech.internal:9000", "http://speech.internal:9000"),
    }
    raw, expected = values[name]
    s = load_settings(environ={f"SPEACHES_{name.upper()}": raw})
    assert getattr(s, name) == expected
    assert s.sources[name] == f"environment variable SPEACHES_{name.upper()}"


def test_earshot_name_beats_seed_alias(cwd: Path) -> None:
    s = load_settings(environ={"SPEACHES_MAX_MODELS": "2", "EARSHOT_MAX_MODELS": "5"})
    assert s.max_models == 5


def test_seed_names_in_dotenv(cwd: Path) -> None:
    write(cwd / ".env", "SPEACHES_MODEL_IDLE_TIMEOUT=21600\n")
    s = load_settings(environ={})
    assert s.model_idle_timeout == 21600


def test_seed_prefix_only_covers_the_seed_settings(cwd: Path) -> None:
    s = load_settings(environ={"SPEACHES_PORT": "1234", "MODEL_IDLE_TIMEOUT": "5"})
    assert s.port == 8000
    assert s.model_idle_timeout == 300


def test_config_file_from_environment(cwd: Path) -> None:
    config = write(cwd / "other.yaml", "model_management:\n  max_models: 4\n")
    s = load_settings(environ={"EARSHOT_CONFIG": str(config)})
    assert s.max_models == 4


def test_preload_models_json_or_comma_list(cwd: Path) -> None:
    assert load_settings(environ={"EARSHOT_PRELOAD_MODELS": '["a/b", "c"]'}).preload_models == ["a/b", "c"]
    assert load_settings(environ={"EARSHOT_PRELOAD_MODELS": "a/b, c"}).preload_models == ["a/b", "c"]


def test_memory_budget_accepts_units(cwd: Path) -> None:
    assert load_settings(environ={"EARSHOT_MEMORY_BUDGET_BYTES": "2GiB"}).memory_budget_bytes == 2 * 1024**3


def test_config_models_entries(cwd: Path) -> None:
    config = write(
        cwd / "config.yaml",
        "models:\n  - id: small\n    repo: Systran/faster-whisper-small\n    pin: true\n    idle_timeout: -1\n",
    )
    s = load_settings(config_file=config, environ={})
    assert s.models[0].repo == "Systran/faster-whisper-small"
    assert s.models[0].pin is True


def test_secrets_are_redacted(cwd: Path) -> None:
    s = load_settings(environ={"EARSHOT_API_KEY": "sk-very-secret"})
    shown = s.effective()["api_key"]
    assert shown == {"value": "**********", "source": "environment variable EARSHOT_API_KEY"}
    assert "sk-very-secret" not in repr(s.effective())


@pytest.mark.parametrize(
    ("environ", "cli", "yaml", "expected"),
    [
        (
            {"SPEACHES_MAX_MODELS": "-1"},
            {},
            None,
            "invalid setting max_models='-1' (from environment variable SPEACHES_MAX_MODELS): "
            "Input should be greater than or equal to 1",
        ),
        (
            {"EARSHOT_MODEL_IDLE_TIMEOUT": "abc"},
            {},
            None,
            "invalid setting model_idle_timeout='abc' (from environment variable EARSHOT_MODEL_IDLE_TIMEOUT): "
            "Input should be a valid number, unable to parse string as a number",
        ),
        (
            {},
            {"max_models": "-3"},
            None,
            "invalid setting max_models='-3' (from command-line flag --max-models): "
            "Input should be greater than or equal to 1",
        ),
        (
            {"EARSHOT_MODEL_IDLE_TIMEOUT": "-5"},
            {},
            None,
            "invalid setting model_idle_timeout='-5' (from environment variable EARSHOT_MODEL_IDLE_TIMEOUT): "
            "Value error, must be -1 (never unload), 0 (unload after each request) or a positive number",
        ),
        (
            {},
            {},
            "model_management:\n  idle_timeout: abc\n",
            "invalid setting model_idle_timeout='abc' (from config file {config} (key model_management.idle_timeout)): "
            "Input should be a valid number, unable to parse string as a number",
        ),
        (
            {},
            {},
            "model_management:\n  idle_timeout: 5\n  keep_forever: true\n",
            "config file {config}: unknown key model_management.keep_forever (known keys: idle_timeout, max_models, "
            "preload_models, load_timeout, memory_budget_bytes, pin_preloaded)",
        ),
        (
            {},
            {},
            "idle_timeout_typo: 5\n",
            "unknown setting 'idle_timeout_typo' (from config file {config} (key idle_timeout_typo))",
        ),
        (
            {"EARSHOT_DEVICE": "tpu"},
            {},
            None,
            "invalid setting device='tpu' (from environment variable EARSHOT_DEVICE): "
            "Input should be 'auto', 'cpu' or 'cuda'",
        ),
        (  # 0 used to mean "no limit" to the cache and "a budget" to the metrics: now it is refused
            {"EARSHOT_MEMORY_BUDGET_BYTES": "0"},
            {},
            None,
            "invalid setting memory_budget_bytes='0' (from environment variable EARSHOT_MEMORY_BUDGET_BYTES): "
            "Input should be greater than 0",
        ),
    ],
)
def test_bad_values_name_the_setting_and_source(
    cwd: Path, environ: dict[str, str], cli: dict[str, str], yaml: str | None, expected: str
) -> None:
    config = write(cwd / "config.yaml", yaml) if yaml is not None else None
    with pytest.raises(SettingsError) as info:
        load_settings(cli, config_file=config, environ=environ)
    message = str(info.value)
    assert message == expected.format(config=config)
    assert "\n" not in message  # one line


def test_missing_config_file_is_an_error(cwd: Path) -> None:
    with pytest.raises(SettingsError, match=r"config file .*nope\.yaml does not exist"):
        load_settings(config_file=cwd / "nope.yaml", environ={})
