"""earshot's fleet on Ray Serve (DESIGN §10): a gateway deployment running earshot's app, worker
deployments each owning a model cache, a board actor giving the gateway the fleet's view.

Imported only by `earshot fleet` (and its tests and bench): the single-process server never
imports it, nor Ray. Importing it sets RAY_USAGE_STATS_ENABLED=0 before anything imports Ray.

- run.py      start/join Ray, deploy, serve until a signal
- worker.py   the worker deployment (ModelCache + backends + LocalInference, multiplexed by model)
- gateway.py  the gateway deployment (earshot's Litestar app on FleetInference) and fleet metrics
- board.py    the board actor: worker registrations, events and models, heartbeats
- errors.py   earshot's errors across the Ray boundary
"""

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
