"""weft setup-cni: install the CNI plugin and a network configuration list.

The plugin (``<bin-dir>/weft``, default /opt/cni/bin) is the compiled shim (weft/cni/shim.c,
built here with the system C compiler, ``cc -O2``, static when that links): it starts in well
under a millisecond and hands each call to the router over ``cni.sock`` beside the router's API
socket (``/run/weft/cni.sock`` for ``--api-socket /run/weft/weft.sock``), which runs the plugin
logic in-process; when the router cannot be reached it runs the Python plugin, with this
interpreter, exactly as the launcher below would. Without a C compiler (or with ``--python``)
the Python launcher itself is installed instead, and a line on stderr says so.

The launcher (``<bin-dir>/weft``, default /opt/cni/bin) is a three-line Python script whose
shebang names this interpreter by its absolute, resolved path with ``-I -S`` (isolated, no site):
no version-manager shim (pyenv's costs ~100-200 ms per call), no site-packages scan, no .pth
hooks. It puts the directory holding the ``weft`` package first on ``sys.path`` and calls
``weft.cni.plugin.main``. Measured on this machine: ~20 ms per VERSION call against ~9 ms for a
bare interpreter, where a console script through the shim takes ~150 ms.

The conflist (``<conf-dir>/10-weft.conflist``, default /etc/cni/net.d) chains weft with the
reference ``portmap`` plugin at spec 1.0.0 (the reference plugins stop at 1.0.0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import weft
from weft.cni.plugin import DEFAULT_SOCKET, DEFAULT_SPOOL_DIR
from weft.cni.shim_server import shim_socket_for

__all__ = [
    "Installed",
    "ShimBuildError",
    "build_shim",
    "conflist",
    "fallback_code",
    "find_compiler",
    "install",
    "launcher_text",
    "main",
    "shim_source",
]

DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
CONFLIST_NAME = "10-weft.conflist"


@dataclass(frozen=True)
class Installed:
    """What ``install`` wrote.

    launcher: the plugin (``<bin-dir>/weft``); conflist: the network configuration list;
    interpreter: the Python the launcher or the shim's fallback runs;
    shim: True when the plugin is the compiled shim, False for the Python launcher;
    note: why the Python launcher was installed ('' with the shim).
    """

    launcher: Path
    conflist: Path
    interpreter: str
    shim: bool = False
    note: str = ""


class ShimBuildError(Exception):
    """The shim could not be compiled (no compiler, or it failed); the message says why."""


def shim_source() -> Path:
    """The shim's C source, shipped in the package."""
    return Path(__file__).resolve().parent / "shim.c"


def find_compiler() -> str | None:
    """The system C compiler (``$CC``, else ``cc``, ``gcc``, ``clang``), or None."""
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _c_string(text: str) -> str:
    """``text`` as a C string literal (octal escapes for anything not plain ASCII)."""
    out = []
    for byte in text.encode():
        ch = chr(byte)
        if ch in '"\\?':
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def fallback_code(package_parent: str | None = None) -> str:
    """The Python program the shim runs (``python -IS -c``) when the router cannot be asked."""
    parent = package_parent or str(Path(weft.__file__).resolve().parent.parent)
    return (
        "import sys\n"
        f"sys.path.insert(0, {parent!r})\n"
        "from weft.cni.plugin import main\n"
        "sys.exit(main())\n"
    )


def build_shim(
    out: Path,
    shim_socket: str,
    python: str | None = None,
    package_parent: str | None = None,
    *,
    compiler: str | None = None,
    answer_timeout: int = 240,
) -> None:
    """Compile the shim into ``out`` (atomically, mode 0755): static when that links.

    ``shim_socket``: the router's shim socket; ``python`` and ``package_parent``: the Python
    plugin it falls back to; ``answer_timeout``: seconds to wait for the router's answer.
    Raises ShimBuildError.
    """
    cc = compiler or find_compiler()
    if cc is None:
        raise ShimBuildError("no C compiler (cc) found")
    if len(os.fsencode(shim_socket)) >= 108:
        raise ShimBuildError(f"shim socket path too long: {shim_socket}")
    defines = [
        f"-DWEFT_CNI_SOCKET={_c_string(shim_socket)}",
        f"-DWEFT_PYTHON={_c_string(python or interpreter())}",
        f"-DWEFT_PYTHON_CODE={_c_string(fallback_code(package_parent))}",
        f"-DWEFT_ANSWER_TIMEOUT={int(answer_timeout)}",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="weft-shim-") as tmp:
        binary = Path(tmp) / "weft"
        errors = ""
        for static in (["-static"], []):
            argv = [cc, "-O2", *static, *defines, "-o", str(binary), str(shim_source())]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                break
            errors = proc.stderr.strip()[-500:]
        else:
            raise ShimBuildError(f"{os.path.basename(cc)} failed: {errors}")
        tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.copyfile(binary, tmp_out)
        os.chmod(tmp_out, 0o755)
        os.replace(tmp_out, out)


def interpreter() -> str:
    """This interpreter's real path (never a shim: ``sys.executable`` resolved)."""
    return os.path.realpath(sys.executable)


def launcher_text(python: str | None = None, package_parent: str | None = None) -> str:
    python = python or interpreter()
    parent = package_parent or str(Path(weft.__file__).resolve().parent.parent)
    return (
        f"#!{python} -IS\n"
        "# weft CNI plugin launcher, written by `weft setup-cni`\n"
        "import sys\n"
        f"sys.path.insert(0, {parent!r})\n"
        "from weft.cni.plugin import main\n"
        "sys.exit(main())\n"
    )


def conflist(
    name: str = "weft",
    socket: str = DEFAULT_SOCKET,
    spool_dir: str = DEFAULT_SPOOL_DIR,
    hairpin: bool = True,
    portmap: bool = True,
    cni_version: str = "1.0.0",
) -> dict[str, Any]:
    plugin: dict[str, Any] = {
        "type": "weft",
        "socket": socket,
        "hairpinMode": hairpin,
        "capabilities": {"ips": True},  # static addresses from the runtime (podman --ip)
    }
    if spool_dir != DEFAULT_SPOOL_DIR:
        plugin["spoolDir"] = spool_dir
    plugins: list[dict[str, Any]] = [plugin]
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}, "snat": True})
    return {"cniVersion": cni_version, "name": name, "plugins": plugins}


def _write_atomic(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def install(
    bin_dir: str = DEFAULT_BIN_DIR,
    conf_dir: str = DEFAULT_CONF_DIR,
    *,
    name: str = "weft",
    socket: str = DEFAULT_SOCKET,
    spool_dir: str = DEFAULT_SPOOL_DIR,
    hairpin: bool = True,
    portmap: bool = True,
    cni_version: str = "1.0.0",
    conf_name: str = CONFLIST_NAME,
    shim: bool = True,
    shim_socket: str | None = None,
) -> Installed:
    """Write the plugin and the conflist; returns where they went.

    ``shim``: compile the shim when a C compiler is there (else, or when it fails, the Python
    launcher, and ``Installed.note`` says why); ``shim_socket``: its socket (default
    ``cni.sock`` beside ``socket``).
    """
    launcher = Path(bin_dir) / "weft"
    note = "the Python launcher was asked for (--python)"
    built = False
    if shim:
        try:
            build_shim(launcher, shim_socket or shim_socket_for(socket))
            built = True
        except ShimBuildError as err:
            note = f"{err}; installed the Python launcher (~15-35 ms more per call)"
    if not built:
        _write_atomic(launcher, launcher_text(), 0o755)
    conf_path = Path(conf_dir) / conf_name
    conf = conflist(name, socket, spool_dir, hairpin, portmap, cni_version)
    _write_atomic(conf_path, json.dumps(conf, indent=2) + "\n", 0o644)
    return Installed(launcher, conf_path, interpreter(), built, "" if built else note)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``setup-cni`` options, for the CLI's subcommand parser."""
    parser.add_argument("--bin-dir", default=DEFAULT_BIN_DIR, help="where the plugin goes")
    parser.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, help="where the conflist goes")
    parser.add_argument("--network-name", default="weft", help="CNI network name")
    parser.add_argument("--api-socket", default=DEFAULT_SOCKET, help="the router's unix socket")
    parser.add_argument("--spool-dir", default=DEFAULT_SPOOL_DIR, help="pending-release spool")
    parser.add_argument("--no-hairpin", action="store_true", help="disable hairpin mode")
    parser.add_argument("--no-portmap", action="store_true", help="do not chain portmap")
    parser.add_argument(
        "--shim-socket",
        default=None,
        help="the router's socket for the compiled shim (default: cni.sock beside --api-socket)",
    )
    parser.add_argument(
        "--python",
        action="store_true",
        help="install the Python launcher, not the compiled shim (the default needs a C "
        "compiler, cc; without one the launcher is installed and a line on stderr says so)",
    )


def run_args(args: argparse.Namespace) -> int:
    done = install(
        args.bin_dir,
        args.conf_dir,
        name=args.network_name,
        socket=args.api_socket,
        spool_dir=args.spool_dir,
        hairpin=not args.no_hairpin,
        portmap=not args.no_portmap,
        shim=not args.python,
        shim_socket=args.shim_socket,
    )
    if done.note and not args.python:
        print(f"weft setup-cni: {done.note}", file=sys.stderr)
    kind = "compiled shim, falling back to" if done.shim else "launcher for"
    print(f"installed {done.launcher} ({kind} python {done.interpreter}) and {done.conflist}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``weft setup-cni [--bin-dir DIR] [--conf-dir DIR] ...``"""
    parser = argparse.ArgumentParser(
        prog="weft setup-cni",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
