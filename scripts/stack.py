"""`make stack`: earshot + Prometheus + Alertmanager on loopback, configured from the repository.

The compose stack (compose.yaml) without Docker: earshot (this checkout, the demo models in
./models), Debian's `prometheus` and `prometheus-alertmanager`, and a small built-in webhook
receiver that prints the alerts Alertmanager sends. The Prometheus and Alertmanager configurations
are derived from prometheus.yml and alertmanager.yml (targets and webhook rewritten to loopback,
the real alerts/*.rules.yml) into the run directory (.stack/, git-ignored), with the data
directories and the logs. Runs until Ctrl-C (or SIGTERM), then stops every process it started.

earshot sees your EARSHOT_*/SPEACHES_* environment and runs in the repository root (so .env and
config.yaml there apply), as `make run` does; e.g. `EARSHOT_MAX_MODELS=1 make stack`.

The reusable part is tests/support/stack.py (the end-to-end tests use it too).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.stack import Stack, StackError, print_notification  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--earshot-port", type=int, default=8000)
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--alertmanager-port", type=int, default=9093)
    parser.add_argument(
        "--receiver-port", type=int, default=5001, help="port of the built-in webhook receiver"
    )
    parser.add_argument("--receiver-url", help="send alerts to this webhook instead of the built-in receiver")
    parser.add_argument("--run-dir", type=Path, default=REPO / ".stack", help="configs, data and logs")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--scrape-interval", help="override prometheus.yml's scrape_interval (e.g. 5s)")
    parser.add_argument(
        "--evaluation-interval", help="override prometheus.yml's evaluation_interval (e.g. 5s)"
    )
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """The first Ctrl-C/SIGTERM/SIGHUP unwinds through the `with` (which stops everything); more of
    them while it stops are ignored, so they cannot cut the stopping short."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    print(f"\n{signal.Signals(signum).name}: stopping ...", flush=True)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    stack = Stack(
        run_dir=args.run_dir,
        earshot_port=args.earshot_port,
        prometheus_port=args.prometheus_port,
        alertmanager_port=args.alertmanager_port,
        receiver_port=args.receiver_port,
        receiver_url=args.receiver_url,
        scrape_interval=args.scrape_interval,
        evaluation_interval=args.evaluation_interval,
        models_dir=args.models_dir.resolve(),
        inherit_env=True,
        earshot_cwd=REPO,
        on_notification=print_notification,
    )
    print(f"starting earshot, prometheus and alertmanager (logs in {stack.run_dir / 'logs'}) ...", flush=True)
    try:
        with stack:
            print(
                f"\n  earshot       {stack.earshot_url}   (/metrics, /api/ps, /docs)\n"
                f"  prometheus    {stack.prometheus_url}   (/alerts, /targets)\n"
                f"  alertmanager  {stack.alertmanager_url}\n"
                f"  alerts to     {stack.webhook_url}"
                + ("   (built-in receiver: printed here)" if args.receiver_url is None else "")
                + f"\n  configs       {stack.prometheus_config_path}, {stack.alertmanager_config_path}"
                "\n\nCtrl-C stops everything.",
                flush=True,
            )
            while True:
                stack.check_running()
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    except StackError as e:
        print(f"stack: {e}", file=sys.stderr)
        return 1
    finally:
        left = stack.leftovers()
        if left:
            print(f"stack: could not stop {', '.join(left)}: {stack.pids()}", file=sys.stderr)
    print("stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
