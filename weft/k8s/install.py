"""The DaemonSet's init step: put the CNI plugin, a Python to run it, and the conflist on the host.

``python -m weft.k8s.install --host-root /host`` (the image's init container, with the host's
``/opt/cni/bin``, ``/etc/cni/net.d`` and ``/opt/weft`` mounted under ``/host``) writes:

* ``/opt/weft/python/``: this interpreter's binary and standard library (no site-packages, tests
  or GUI modules; about 40 MB), so the plugin runs on a host without Python. The interpreter
  finds its library next to itself (``bin/../lib/python3.X``), and the launcher's ``-I`` keeps
  the host's environment out. Needs a Python built without a shared libpython (Debian's is) and
  a host glibc at least as new as the image's.
* ``/opt/weft/lib/weft/``: the weft package (the plugin imports only the standard library);
* ``/opt/cni/bin/weft``: the plugin: the compiled CNI shim (weft/cni/shim.c) when the image
  carries one built for these paths (``--build-shim``, see below) or ``--shim compile`` finds a C
  compiler in the image, else the Python launcher (weft/cni/install.py's). Either way it runs the
  copied Python above when the router cannot be reached; the shim reaches the router on
  ``/run/weft/cni.sock`` (beside ``--api-socket``, a hostPath shared with the router's pod);
* ``/etc/cni/net.d/10-weft.conflist``: weft chained with ``portmap`` (weft/cni/install.py).

Each tree is written beside the old one and swapped in with a rename, so a kubelet calling the
plugin during an upgrade sees either the old or the new one, never half of each. A runtime with
the same version stamp is kept as is (restarts of the pod copy nothing).

A prebuilt shim: ``python -m weft.k8s.install --build-shim /opt/weft-shim/weft`` at image build
time (a stage with ``cc``; the result is a static binary, no compiler needed later) writes the
binary and ``weft.json`` beside it naming the paths it was built for. The init step copies it to
the host when those match its own (``--runtime-dir``, ``--api-socket``), else falls back as above.
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
from weft.cni.install import CONFLIST_NAME, ShimBuildError, build_shim, conflist, launcher_text
from weft.cni.plugin import DEFAULT_SOCKET
from weft.cni.shim_server import shim_socket_for

__all__ = ["build_prebuilt_shim", "install_on_host", "main", "shim_settings"]

DEFAULT_PREBUILT_SHIM = "/opt/weft-shim/weft"

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


def shim_settings(runtime_dir: str, socket: str) -> dict[str, str]:
    """What a shim for this host must have compiled in: the copied Python, the copied package
    and the router's shim socket."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    runtime = runtime_dir.rstrip("/")
    return {
        "python": f"{runtime}/python/bin/{version}",
        "package_parent": f"{runtime}/lib",
        "shim_socket": shim_socket_for(socket),
    }


def _sidecar(shim: Path) -> Path:
    return shim.with_name(f"{shim.name}.json")


def build_prebuilt_shim(
    out: Path, runtime_dir: str = "/opt/weft", socket: str = DEFAULT_SOCKET
) -> Path:
    """Compile the shim for hosts set up by ``install_on_host`` (image build time); writes the
    binary and its settings beside it. Raises ShimBuildError."""
    settings = shim_settings(runtime_dir, socket)
    build_shim(out, settings["shim_socket"], settings["python"], settings["package_parent"])
    _write(_sidecar(out), json.dumps(settings, indent=2) + "\n", 0o644)
    return out


def _place_plugin(
    plugin: Path, runtime_dir: str, socket: str, shim: str, prebuilt: Path
) -> str:
    """Write the plugin at ``plugin``; returns what it is (``shim (...)`` or ``launcher``)."""
    settings = shim_settings(runtime_dir, socket)
    if shim != "never":
        try:
            if json.loads(_sidecar(prebuilt).read_text()) == settings:
                tmp = plugin.with_name(f".{plugin.name}.tmp")
                plugin.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(prebuilt, tmp)
                os.chmod(tmp, 0o755)
                os.replace(tmp, plugin)
                return f"shim (prebuilt {prebuilt})"
        except (OSError, ValueError):
            pass
    if shim == "compile":
        try:
            build_shim(plugin, settings["shim_socket"], settings["python"],
                       settings["package_parent"])
            return "shim (compiled here)"
        except ShimBuildError as err:
            print(f"weft: cannot build the CNI shim ({err}); installing the Python launcher",
                  file=sys.stderr)
    _write(plugin, launcher_text(python=settings["python"],
                                 package_parent=settings["package_parent"]), 0o755)
    return "launcher"


def install_on_host(
    host_root: Path,
    *,
    runtime_dir: str = "/opt/weft",
    bin_dir: str = "/opt/cni/bin",
    conf_dir: str = "/etc/cni/net.d",
    network: str = "weft",
    socket: str = DEFAULT_SOCKET,
    portmap: bool = True,
    shim: str = "auto",
    prebuilt_shim: str = DEFAULT_PREBUILT_SHIM,
) -> list[Path]:
    """Install everything under ``host_root`` (``/`` on the host itself); returns the paths.

    ``runtime_dir``, ``bin_dir`` and ``conf_dir`` are paths as the host sees them. ``shim``:
    ``auto`` (the prebuilt shim when it matches, else the launcher), ``compile`` (also try the
    C compiler) or ``never`` (the launcher).
    """
    def on_host(path: str) -> Path:
        return host_root / path.lstrip("/")

    runtime = on_host(runtime_dir)
    _copy_runtime(runtime / "python")
    _copy_package(runtime / "lib")
    launcher = on_host(bin_dir) / "weft"
    what = _place_plugin(launcher, runtime_dir, socket, shim, Path(prebuilt_shim))
    print(f"CNI plugin {launcher}: {what}")
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
    parser.add_argument("--shim", choices=("auto", "compile", "never"), default="auto",
                        help="the compiled CNI shim: prebuilt when it matches (auto), also "
                        "compile it here (compile), or the Python launcher (never)")
    parser.add_argument("--prebuilt-shim", default=DEFAULT_PREBUILT_SHIM)
    parser.add_argument("--build-shim", metavar="OUT", default=None,
                        help="only compile the shim for these paths into OUT (image build)")
    args = parser.parse_args(argv)
    if args.build_shim:
        try:
            built = build_prebuilt_shim(Path(args.build_shim), args.runtime_dir, args.api_socket)
        except ShimBuildError as err:
            print(f"weft: {err}", file=sys.stderr)
            return 1
        print(f"built {built}")
        return 0
    for path in install_on_host(
        Path(args.host_root),
        runtime_dir=args.runtime_dir,
        bin_dir=args.bin_dir,
        conf_dir=args.conf_dir,
        network=args.network_name,
        socket=args.api_socket,
        portmap=not args.no_portmap,
        shim=args.shim,
        prebuilt_shim=args.prebuilt_shim,
    ):
        print(f"installed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
