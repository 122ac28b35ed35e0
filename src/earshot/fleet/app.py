"""The fleet as a Serve application: what `earshot fleet` deploys, and the application builder a
KubeRay RayService (or `serve run earshot.fleet.app:build_app`) names in its `import_path`.

The builder runs where Serve builds applications (connected to the cluster): settings come from
the EARSHOT_* variables of the application's runtime_env, as everywhere else, with the builder's
`args` as overrides by setting name; the board actor the gateway and the workers share is found or
created by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from earshot.fleet.run import NAMESPACE, quiet_ray_env
from earshot.settings import Settings, load_settings

HEARTBEAT_S = 1.0
LOST_AFTER_S = 5.0


def board_actor(settings: Settings, *, lost_after_s: float = LOST_AFTER_S) -> Any:
    """The fleet's board: the named actor of this namespace, created if it is not there yet."""
    import ray

    from earshot.fleet.board import BOARD_NAME, Board

    return (
        ray.remote(Board)
        .options(name=BOARD_NAME, namespace=NAMESPACE, get_if_exists=True, num_cpus=0, max_concurrency=1000)
        .remote(size=settings.events_buffer_size, lost_after=lost_after_s)
    )


def application(settings: Settings, board: Any, *, heartbeat_s: float = HEARTBEAT_S) -> Any:
    """The gateway bound to the worker deployment (a Serve `Application`)."""
    from earshot.fleet.gateway import gateway_deployment
    from earshot.fleet.worker import worker_deployment

    workers = worker_deployment(settings).bind(settings, board, heartbeat_s)
    return gateway_deployment(settings).bind(settings, workers, board)


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """Serve's application builder: settings from the environment, `args` (setting names) over them."""
    quiet_ray_env()
    settings = load_settings(dict(args or {}), env_file=None)
    return application(settings, board_actor(settings))
