"""Generated gRPC/protobuf modules, built from `protos/*.proto` with grpcio-tools.

The generated code is never committed or hand-edited: `make` builds it at install
(`python -m expertmesh.core.protos`), and importing this module rebuilds it if a .proto changed since
(stamp = hash of the .proto files), so an edited contract can never be served stale. Generation writes
to a temporary directory and renames it into place, so concurrent processes (Ray replicas) never see a
half-written package.

Usage: `from expertmesh.core.protos import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[2] / "protos"
GEN_DIR = Path(__file__).resolve().parent / "_generated"
PROTO_FILES = ("expert.proto", "router.proto")


def _stamp() -> str:
    digest = hashlib.sha256()
    for name in PROTO_FILES:
        digest.update((PROTO_DIR / name).read_bytes())
    return digest.hexdigest()


def build(force: bool = False) -> Path:
    """Generate the *_pb2 / *_pb2_grpc modules into services/core/_generated unless already current."""
    stamp = _stamp()
    stamp_file = GEN_DIR / "STAMP"
    if not force and stamp_file.exists() and stamp_file.read_text() == stamp:
        return GEN_DIR
    from grpc_tools import protoc  # imported lazily: only needed when (re)building

    tmp = Path(tempfile.mkdtemp(prefix="_generated.", dir=GEN_DIR.parent))
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
    args += [str(PROTO_DIR / name) for name in PROTO_FILES]
    include = Path(protoc.__file__).parent / "_proto"
    args.insert(1, f"-I{include}")
    if protoc.main(args) != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"protoc failed on {PROTO_DIR}")
    (tmp / "__init__.py").write_text('"""Generated from protos/ by expertmesh.core.protos; do not edit."""\n')
    (tmp / "STAMP").write_text(stamp)
    old = None
    if GEN_DIR.exists():
        old = GEN_DIR.with_name(f"_generated.old.{os.getpid()}")
        try:
            GEN_DIR.rename(old)
        except OSError:  # another process replaced it at the same moment: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return GEN_DIR
    try:
        tmp.rename(GEN_DIR)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return GEN_DIR


def _load():
    build()
    # grpc's generated *_pb2_grpc does `import expert_pb2`; give it the package path via a module alias.
    pkg = "expertmesh.core._generated"
    modules = {}
    for name in ("expert_pb2", "router_pb2"):
        modules[name] = importlib.import_module(f"{pkg}.{name}")
        sys.modules.setdefault(name, modules[name])
    for name in ("expert_pb2_grpc", "router_pb2_grpc"):
        modules[name] = importlib.import_module(f"{pkg}.{name}")
    return modules


_modules = _load()
expert_pb2 = _modules["expert_pb2"]
expert_pb2_grpc = _modules["expert_pb2_grpc"]
router_pb2 = _modules["router_pb2"]
router_pb2_grpc = _modules["router_pb2_grpc"]

if __name__ == "__main__":
    print(build(force="--force" in sys.argv))
