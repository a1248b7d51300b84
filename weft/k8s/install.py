"""The DaemonSet's init step: put the CNI plugin, a Python to run it, and the conflist on the host.

``python -m weft.k8s.install --host-root /host`` (the image's init container, with the host's
``/opt/cni/bin``, ``/etc/cni/net.d`` and ``/opt/weft`` mounted under ``/host``) writes:

* ``/opt/weft/python/``: this interpreter's binary and standard library (no site-packages, tests
  or GUI modules; about 40 MB), so the plugin runs on a host without Python. The interpreter
  finds its library next to itself (``bin/../lib/python3.X``), and the launcher's ``-I`` keeps
  the host's environment out. Needs a Python built without a shared libpython (Debian's is) and
  a host glibc at least as new as the image's.
* ``/opt/weft/lib/weft/``: the weft package (the plugin imports only the standard library);
* ``/opt/cni/bin/weft``: the launcher (weft/cni/install.py's, pointing at the two above);
* ``/etc/cni/net.d/10-weft.conflist``: weft chained with ``portmap`` (weft/cni/install.py).

Each tree is written beside the old one and swapped in with a rename, so a kubelet calling the
plugin during an upgrade sees either the old or the new one, never half of each. A runtime with
the same version stamp is kept as is (restarts of the pod copy nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Final

import weft
from weft.cni.install import CONFLIST_NAME, conflist, launcher_text
from weft.cni.plugin import DEFAULT_SOCKET

__all__ = ["install_on_host", "main"]

_SKIP: Final = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "tkinter", "turtledemo",
    "ensurepip", "lib2to3", "pydoc_data", "__phello__", "venv",
}


def _stamp() -> str:
    return f"weft {weft.__version__} python {sys.version.split()[0]} {sys.executable}"


def _swap_in(build: Path, final: Path) -> None:
    """Replace ``final`` by ``build`` with renames (old tree removed afterwards)."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(build, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _copy_runtime(target: Path) -> None:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stamp = target / "STAMP"
    if stamp.exists() and stamp.read_text() == _stamp():
        return
    build = target.with_name(f".{target.name}.new")
    if build.exists():
        shutil.rmtree(build)
    (build / "bin").mkdir(parents=True)
    shutil.copy2(os.path.realpath(sys.executable), build / "bin" / version)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(
        stdlib,
        build / "lib" / version,
        symlinks=True,
        ignore=lambda d, names: [n for n in names if n in _SKIP or n.startswith("config-")],
    )
    (build / "STAMP").write_text(_stamp())
    _swap_in(build, target)


def _copy_package(target: Path) -> None:
    build = target.with_name(f".{target.name}.new")
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    shutil.copytree(
        Path(weft.__file__).resolve().parent,
        build / "weft",
        ignore=shutil.ignore_patterns("__pycache__", "static"),
    )
    _swap_in(build, target)


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def install_on_host(
    host_root: Path,
    *,
    runtime_dir: str = "/opt/weft",
    bin_dir: str = "/opt/cni/bin",
    conf_dir: str = "/etc/cni/net.d",
    network: str = "weft",
    socket: str = DEFAULT_SOCKET,
    portmap: bool = True,
) -> list[Path]:
    """Install everything under ``host_root`` (``/`` on the host itself); returns the paths.

    ``runtime_dir``, ``bin_dir`` and ``conf_dir`` are paths as the host sees them.
    """
    def on_host(path: str) -> Path:
        return host_root / path.lstrip("/")

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    runtime = on_host(runtime_dir)
    _copy_runtime(runtime / "python")
    _copy_package(runtime / "lib")
    launcher = on_host(bin_dir) / "weft"
    _write(
        launcher,
        launcher_text(
            python=f"{runtime_dir.rstrip('/')}/python/bin/{version}",
            package_parent=f"{runtime_dir.rstrip('/')}/lib",
        ),
        0o755,
    )
    conf = on_host(conf_dir) / CONFLIST_NAME
    doc = conflist(network, socket, portmap=portmap)
    _write(conf, json.dumps(doc, indent=2) + "\n", 0o644)
    return [runtime / "python", runtime / "lib", launcher, conf]


def main(argv: list[str] | None = None) -> int:
    """``python -m weft.k8s.install [--host-root /host] ...``"""
    parser = argparse.ArgumentParser(prog="python -m weft.k8s.install",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--host-root", default="/host", help="where the host's / is mounted")
    parser.add_argument("--runtime-dir", default="/opt/weft")
    parser.add_argument("--bin-dir", default="/opt/cni/bin")
    parser.add_argument("--conf-dir", default="/etc/cni/net.d")
    parser.add_argument("--network-name", default="weft")
    parser.add_argument("--api-socket", default=DEFAULT_SOCKET)
    parser.add_argument("--no-portmap", action="store_true")
    args = parser.parse_args(argv)
    for path in install_on_host(
        Path(args.host_root),
        runtime_dir=args.runtime_dir,
        bin_dir=args.bin_dir,
        conf_dir=args.conf_dir,
        network=args.network_name,
        socket=args.api_socket,
        portmap=not args.no_portmap,
    ):
        print(f"installed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
