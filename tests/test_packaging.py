"""The package as users get it: a wheel of this checkout, installed non-editable into a fresh venv, serves.

- the wheel carries the gRPC modules generated at build time (setup.py's build_py hook) and the demo model;
- installed with `--no-deps` into a fresh venv of the base interpreter, whose dependencies come from .venv's
  site-packages through a .pth line (a directory added that way is not scanned for .pth files, so .venv's
  editable `expertmesh` finder is never loaded): `expertmesh` resolves inside the fresh venv;
- `expertmesh serve` from that venv, on its default (the demo model inside the package), answers a chat
  completion through its gateway, and Ctrl-C leaves none of its processes behind.

The wheel is built from a copy of the checkout's files (tracked, and untracked but not ignored), so nothing
ignored (the in-tree services/core/_generated, a stale build/ directory) can leak into it, and without build
isolation (setuptools and grpcio-tools come from .venv: the test runs offline).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from conftest import free_port, serve_flags

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("__init__", "expert_pb2", "expert_pb2_grpc")


def _run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _copy_checkout(dst: Path) -> Path:
    """The checkout's files (tracked, and untracked but not ignored) copied to `dst`."""
    files = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], 60, cwd=ROOT).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is not part of the checkout
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    assert not (dst / "services" / "core" / "_generated").exists()
    return dst


def _make_venv(venv: Path) -> Path:
    """A venv of the base interpreter (not .venv's) that sees .venv's site-packages through a .pth line."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    # Without pip: the interpreter's bundled setuptools would shadow .venv's (the build backend's) in builds.
    _run([base, "-m", "venv", "--without-pip", str(venv)], 300)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", purelib], 60).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # .venv's, in order
    (site / "zz_expertmesh_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return python


def _pip(python: Path, *args: str) -> list[str]:
    """.venv's pip acting on another environment (`--python`): the fresh venvs have no pip of their own."""
    return [sys.executable, "-m", "pip", "--python", str(python), *args]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src, dist = _copy_checkout(work / "src"), work / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], 300)
    (whl,) = dist.glob("expertmesh-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A venv with only the wheel installed; its dependencies are .venv's."""
    venv = tmp_path_factory.mktemp("venv") / "fresh"
    python = _make_venv(venv)
    _run(_pip(python, "install", "-q", "--no-deps", "--no-index", str(wheel)), 300)
    # Dependencies' console scripts are not installed (--no-deps): the pool runs `ray` next to sys.executable,
    # which must run this venv's interpreter (Ray starts its workers with the interpreter `ray start` ran on).
    ray = venv / "bin" / "ray"
    ray.write_text(f"#!{python}\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n")
    ray.chmod(0o755)
    return venv


def _env(venv: Path, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        {"PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", "VIRTUAL_ENV": str(venv), "HOME": str(home)}
    )  # HOME: the stack's logs and pool state files land in the test's directory
    return env


def test_wheel_has_generated_protos_and_demo_model(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for module in GENERATED:
            assert f"expertmesh/core/_generated/{module}.py" in names, module
        grpc_module = zf.read("expertmesh/core/_generated/expert_pb2_grpc.py").decode()
        assert "from . import expert_pb2 as expert__pb2" in grpc_module  # importable inside the package
        stamp = zf.read("expertmesh/core/_generated/STAMP").decode()
        demo = _run(["git", "ls-files", "models/demo"], 60, cwd=ROOT).stdout.split()
        assert "models/demo/model.safetensors" in demo and "models/demo/config.json" in demo
        for name in demo:
            shipped = f"expertmesh/demo/{Path(name).name}"
            assert shipped in names, shipped
            assert _sha256(zf.read(shipped)) == _sha256((ROOT / name).read_bytes()), shipped
        # Only the package: no source-tree directories, no tests.
        assert {n.split("/", 1)[0] for n in names} == {"expertmesh", wheel.name.split("-py3")[0] + ".dist-info"}
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    from expertmesh.core import protos

    assert stamp == protos.stamp(ROOT / "protos")  # generated from this checkout's .proto files
    assert "expertmesh = expertmesh.cli:main" in entry_points
    assert "expertmesh = expertmesh.router.plugin:register" in entry_points


def test_installed_wheel_resolves_inside_the_fresh_venv(fresh_venv, tmp_path):
    probe = (
        "import json, sys, expertmesh\n"
        "from expertmesh.core import protos\n"
        "from expertmesh.stack import DEMO_MODEL\n"
        "print(json.dumps({'package': expertmesh.__file__, 'pb2': protos.expert_pb2.__file__,\n"
        "  'pb2_grpc': protos.expert_pb2_grpc.__file__, 'demo': str(DEMO_MODEL),\n"
        "  'editable_finder': any('__editable__' in m for m in sys.modules), 'prefix': sys.prefix}))\n"
    )
    out = json.loads(
        _run([str(fresh_venv / "bin" / "python"), "-c", probe], 120, cwd=tmp_path, env=_env(fresh_venv, tmp_path))
        .stdout.strip()
        .splitlines()[-1]
    )
    venv = fresh_venv.resolve()
    assert Path(out["prefix"]).resolve() == venv
    for key in ("package", "pb2", "pb2_grpc", "demo"):
        assert Path(out[key]).resolve().is_relative_to(venv), (key, out[key])
    assert out["editable_finder"] is False
    assert Path(out["demo"]).name == "demo" and (Path(out["demo"]) / "model.safetensors").is_file()


def test_editable_install_generates_into_the_checkout(tmp_path):
    """`pip install -e` (what `make` runs) builds the gRPC modules into the source tree its finder maps; a .proto
    edited afterwards makes importing them fail with the regenerate command, which fixes it."""
    src = _copy_checkout(tmp_path / "src")
    python = _make_venv(tmp_path / "venv")
    _run(_pip(python, "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(src)), 300)
    assert sorted(p.name for p in (src / "services" / "core" / "_generated").iterdir()) == sorted(
        [f"{m}.py" for m in GENERATED] + ["STAMP"]
    )
    probe = (
        "import json, expertmesh; from expertmesh.core import protos; from expertmesh.stack import DEMO_MODEL\n"
        "print(json.dumps([expertmesh.__file__, protos.expert_pb2_grpc.__file__, str(DEMO_MODEL)]))"
    )
    env = _env(tmp_path / "venv", tmp_path)
    package, generated, demo = json.loads(_run([str(python), "-c", probe], 120, cwd=tmp_path, env=env).stdout)
    assert Path(package) == src / "services" / "__init__.py"
    assert Path(generated) == src / "services" / "core" / "_generated" / "expert_pb2_grpc.py"
    assert Path(demo) == src / "models" / "demo"
    with open(src / "protos" / "expert.proto", "a") as f:
        f.write("// edited\n")
    stale = subprocess.run(
        [str(python), "-c", "from expertmesh.core.protos import expert_pb2"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert stale.returncode != 0 and "python -m expertmesh.core.protos" in stale.stderr, stale.stderr
    _run([str(python), "-m", "expertmesh.core.protos"], 120, cwd=tmp_path, env=env)
    _run([str(python), "-c", "from expertmesh.core.protos import expert_pb2"], 120, cwd=tmp_path, env=env)


def _stat(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()  # state ppid pgrp session ... (field 22 of stat = index 19: start)


def _tree(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of `pid`'s descendants and of every process in a session one of them leads (Ray's,
    the router's, ...). The start time tells a process from a later one that reuses its pid."""
    rows = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat(int(entry))
        if fields and fields[0] != "Z":
            rows.append((int(entry), int(fields[1]), int(fields[3]), fields[19]))
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, ppid, _, _ in rows if ppid in frontier} - found
        found |= frontier
    sessions = {sid for p, _, sid, _ in rows if p in found and sid in found}
    return {(p, start) for p, _, sid, start in rows if p in found or sid in sessions}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(procs: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """The processes of `procs` still running (the same process: same pid and start time; not a zombie)."""
    alive = set()
    for pid, start in procs:
        fields = _stat(pid)
        if fields and fields[0] != "Z" and fields[19] == start:
            alive.add((pid, start))
    return alive


def _logs(home: Path, serve_log: Path) -> str:
    parts = [f"--- {serve_log.name} ---\n{serve_log.read_text(errors='replace')[-4000:]}" if serve_log.exists() else ""]
    for log in sorted((home / ".cache" / "expertmesh").rglob("*.log")):
        parts.append(f"--- {log} ---\n{log.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


@pytest.mark.timeout(1500)
def test_serve_from_the_wheel_answers_and_stops_cleanly(fresh_venv, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    cmd = [
        str(fresh_venv / "bin" / "expertmesh"),
        "serve",
        *serve_flags(port),
    ]
    serve_out, serve_log = tmp_path / "serve.out", tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    seen: set[tuple[int, str]] = set()
    with open(serve_out, "w") as out, open(serve_log, "w") as err:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, cwd=tmp_path, env=_env(fresh_venv, home), start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600  # Ray + expert replicas + vLLM on 2 shared cores
        while not any(line.startswith("curl ") for line in serve_out.read_text().splitlines()):
            assert proc.poll() is None, f"expertmesh serve exited with {proc.returncode}:\n{_logs(home, serve_log)}"
            assert time.monotonic() < deadline, f"expertmesh serve not ready in 600 s:\n{_logs(home, serve_log)}"
            seen |= _tree(proc.pid)
            time.sleep(1)
        seen |= _tree(proc.pid)

        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["demo"], models
        body = {
            "model": "demo",
            "messages": [{"role": "user", "content": "Speak, my lord."}],
            "max_tokens": 24,
            "temperature": 0,
        }
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=180)
        assert reply.status_code == 200, f"{reply.status_code} {reply.text}\n{_logs(home, serve_log)}"
        content = reply.json()["choices"][0]["message"]["content"]
        assert isinstance(content, str) and content.strip(), reply.json()

        # Every process of the stack runs the fresh venv's interpreter, none .venv's (whose expertmesh is the
        # editable checkout): the router, the gateway, `ray start` and Ray's own Python processes.
        seen |= _tree(proc.pid)
        cmdlines = {pid: _cmdline(pid) for pid, _ in seen}
        fresh_python = str(fresh_venv / "bin" / "python")
        assert not [c for c in cmdlines.values() if str(ROOT / ".venv" / "bin") in c], cmdlines
        for component in ("expertmesh.router.openai_server", "expertmesh.gateway.app", "/ray start"):
            assert any(c.startswith(fresh_python + " ") and component in c for c in cmdlines.values()), (
                component,
                cmdlines,
            )
        # The expert replicas' process titles hide their interpreter; the raylet's worker command names it.
        assert any("/raylet " in c and f"--python_worker_command={fresh_python} " in c for c in cmdlines.values()), [
            c for c in cmdlines.values() if "/raylet " in c
        ]

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=180) == 0, _logs(home, serve_log)
        deadline = time.monotonic() + 15
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {pid: _cmdline(pid) for pid, _ in _alive(seen)}
        assert not left, f"left behind: {left}"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
        assert not list((home / ".cache" / "expertmesh").rglob("pool-*.json"))  # the pool recorded its stop
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        for pid, _ in _alive(seen | _tree(proc.pid)):  # ours only: the processes this test's serve started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
