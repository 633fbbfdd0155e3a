"""Generated gRPC/protobuf modules, built from `protos/*.proto` with grpcio-tools.

The generated code is never committed or hand-edited, and nothing generates it at run time: the package's
build (setup.py's build_py hook, which calls `generate` below) writes `expertmesh.core._generated` into every
wheel, sdist-built install and editable install (for an editable install: services/core/_generated/,
git-ignored). After editing a .proto in a checkout, regenerate with `python -m expertmesh.core.protos`
(`make protos` forces it); until then importing the modules from a checkout fails with that hint instead of
serving a stale contract.

This module's top level imports only the standard library: setup.py loads it by path at build time, before
expertmesh or its dependencies exist. The generated modules load on first attribute access.

Usage: `from expertmesh.core.protos import expert_pb2, expert_pb2_grpc`.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_FILES = ("expert.proto",)
GENERATED_PACKAGE = "expertmesh.core._generated"
# In a source checkout (editable install): the .proto files and the in-tree output directory.
CHECKOUT_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = CHECKOUT_ROOT / "protos"
GEN_DIR = Path(__file__).resolve().parent / "_generated"
# Part of the stamp: bump when the generated files' shape changes (e.g. the import rewrite below), so an
# output directory written by an older generator counts as stale.
_GENERATOR = b"expertmesh-protos-2 relative-imports"
_MODULES = ("expert_pb2", "expert_pb2_grpc")


def stamp(proto_dir: Path = PROTO_DIR) -> str:
    """Hash of the .proto files and the generator version, written next to the generated modules."""
    digest = hashlib.sha256(_GENERATOR)
    for name in PROTO_FILES:
        digest.update((Path(proto_dir) / name).read_bytes())
    return digest.hexdigest()


def generate(proto_dir: Path, out_dir: Path) -> list[Path]:
    """Run grpc_tools.protoc on `proto_dir`'s PROTO_FILES into the package directory `out_dir`.

    Writes to a temporary sibling directory and renames it into place, so concurrent readers never see a
    half-written package. Returns the files written (paths under `out_dir`)."""
    from grpc_tools import protoc  # a build requirement; never needed to import the generated modules

    proto_dir, out_dir = Path(proto_dir).resolve(), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="_generated.", dir=out_dir.parent))
    try:
        include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
        args = ["protoc", f"-I{include}", f"-I{proto_dir}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
        args += [str(proto_dir / name) for name in PROTO_FILES]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_dir}")
        for path in tmp.glob("*_pb2*.py"):
            # protoc writes `import expert_pb2 as expert__pb2` (top-level); inside a package it must be relative.
            text = path.read_text()
            path.write_text(re.sub(r"^import (\w+_pb2) as (\w+)$", r"from . import \1 as \2", text, flags=re.MULTILINE))
        (tmp / "__init__.py").write_text('"""Generated from protos/ by expertmesh.core.protos; do not edit."""\n')
        (tmp / "STAMP").write_text(stamp(proto_dir))
        old = out_dir.with_name(f"{out_dir.name}.old.{tmp.name}")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out_dir.iterdir())


def _in_checkout() -> bool:
    return (CHECKOUT_ROOT / "pyproject.toml").is_file() and all((PROTO_DIR / n).is_file() for n in PROTO_FILES)


def _check_current() -> None:
    """In a checkout, refuse generated modules older than the .proto files (an installed wheel has no protos/)."""
    if not _in_checkout():
        return
    stamp_file = GEN_DIR / "STAMP"
    if not stamp_file.is_file() or stamp_file.read_text() != stamp():
        raise ImportError(
            f"{GEN_DIR} is missing or older than {PROTO_DIR}: regenerate with "
            "`python -m expertmesh.core.protos` (= `make protos`) or reinstall the package"
        )


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _check_current()
    module = importlib.import_module(f"{GENERATED_PACKAGE}.{name}")
    globals()[name] = module
    return module


if __name__ == "__main__":
    # Developer command for a checkout: regenerate services/core/_generated (unless current; --force: always).
    if not _in_checkout():
        sys.exit(f"no protos/ next to {CHECKOUT_ROOT}: regenerating only works in a source checkout")
    current = (GEN_DIR / "STAMP").is_file() and (GEN_DIR / "STAMP").read_text() == stamp()
    if "--force" in sys.argv or not current:
        generate(PROTO_DIR, GEN_DIR)
    print(GEN_DIR)
