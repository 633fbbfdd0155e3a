"""expertmesh: serve Mixture-of-Experts models with the routed experts as independently scaled replicas.

Packages: `core` (shared: wire codec, generated protos, checkpoints, expert kernel, placement plan, telemetry),
`experts` (Ray Serve expert pool, directory, planner, controller), `router` (vLLM plugin + router gRPC
service), `gateway` (OpenAI-compatible HTTP API). `cli` is the single `expertmesh` entry point.
"""

__version__ = "0.1.0"
