"""Build hook: generate `expertmesh.core._generated` (protobuf/gRPC modules) from protos/*.proto at build time.

Everything else about the package is declared in pyproject.toml. The generator is
services/core/protos.py's `generate` (loaded by path: expertmesh is not importable while it is being
built); grpcio-tools is a build requirement there. Wheels get the modules in the build directory; an
editable install gets them in the source tree (services/core/_generated/, git-ignored), which is what its
import finder maps `expertmesh` to. The .proto files go into the sdist so a wheel can be built from it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _protos_module():
    spec = importlib.util.spec_from_file_location("_expertmesh_build_protos", ROOT / "services" / "core" / "protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    """build_py that also writes the generated gRPC modules into expertmesh/core/_generated."""

    def _generated_dir(self) -> Path:
        if self.editable_mode:
            return ROOT / self.get_package_dir("expertmesh.core") / "_generated"
        return Path(self.build_lib) / "expertmesh" / "core" / "_generated"

    def run(self) -> None:
        super().run()
        protos = _protos_module()
        written = protos.generate(ROOT / "protos", self._generated_dir())
        self.announce(f"generated {len(written)} files into {self._generated_dir()}", level=2)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            protos = _protos_module()
            names = [f"{m}.py" for m in protos._MODULES] + ["__init__.py", "STAMP"]
            outputs += [str(self._generated_dir() / n) for n in names]
        return outputs

    def get_source_files(self) -> list[str]:
        # What the sdist carries for this command: the .proto files are the generator's input.
        protos = sorted((ROOT / "protos").glob("*.proto"))
        return super().get_source_files() + [str(p.relative_to(ROOT)) for p in protos]


setup(cmdclass={"build_py": BuildPyWithProtos})
