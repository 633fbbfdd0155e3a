"""The one `expertmesh` command line: `serve`, `experts up|down`, `plan`, `bench`.

Each subcommand lives in its own module exposing `configure(parser)` and `run(args) -> int`; modules are
imported only when their subcommand runs, so `expertmesh --help` stays fast (no torch / vLLM / Ray import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from expertmesh.core import settings

COMMANDS = {
    "serve": ("expertmesh.stack", "start the whole local stack (expert pool, router, gateway) and serve HTTP"),
    "experts": (
        "expertmesh.experts.pool",
        "start (up) or stop (down) the expert pool on a local Ray cluster, or on a running one (--ray-address)",
    ),
    "plan": ("expertmesh.control.plan_cli", "print a placement plan for a checkpoint, optionally from load stats"),
    "bench": ("expertmesh.loadgen", "load-test an OpenAI-compatible server (TTFT, TPOT, throughput, goodput)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:  # only the chosen subcommand's module is imported
            importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OMP threads, vLLM's KV cache size, tokenizers: set before any subcommand imports torch (children inherit them).
    settings.apply_process_defaults()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
