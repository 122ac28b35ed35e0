"""From the Speaches configuration guide ("monitor loaded models"), reconstructed; only the host
changes (BASE_URL). Polls GET /v1/models and prints the models whose `loaded` is true.

    python monitor_models.py [--once] [--interval SECONDS]
"""

import argparse
import os
import time

import httpx

BASE_URL = os.environ.get("BASE_URL", "http://localhost:8000")


def loaded_models():
    response = httpx.get(f"{BASE_URL}/v1/models", timeout=30)
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"] if m.get("loaded")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--interval", type=float, default=3600)
    args = parser.parse_args()
    while True:
        models = loaded_models()
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} loaded: {', '.join(models) if models else '(none)'}")
        if args.once:
            break
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
