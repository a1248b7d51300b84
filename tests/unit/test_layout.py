"""The package tree is the architecture (weft/__init__.py): dependencies point one way between
packages, no module imports another in a circle, protocol cores import no I/O.

Every import counts, including those inside functions and under ``TYPE_CHECKING``: a circle
hidden from the interpreter is still one for a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WEFT = Path(__file__).resolve().parents[2] / "weft"

# package -> the packages it may import (besides itself). Leaves import nothing of weft.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "atomicfile": set(),
    "hostport": set(),
    "jsonlimit": set(),
    "gossip": {"errors"},
    "policy": {"errors"},
    "overlay": {"gossip", "errors"},
    "ipam": {"gossip", "errors"},
    "host": {"errors", "jsonlimit"},
    "ui": {"switch", "errors", "jsonlimit"},  # metrics name the switch's fallback reasons
    "fastdp": {"overlay", "gossip", "errors"},
    "sleeve": {"overlay", "gossip", "host", "errors"},
    "switch": {"sleeve", "fastdp", "overlay", "gossip", "errors"},
    "cni": {"host", "errors", "jsonlimit", "atomicfile"},
    "docker": {"cni", "host", "errors", "jsonlimit", "atomicfile"},
    "k8s": {"cni", "policy", "gossip", "hostport", "errors"},
    "router": {
        "cni", "docker", "k8s", "ipam", "ui", "overlay", "gossip", "host", "hostport",
        "errors", "jsonlimit", "atomicfile",
    },
    "cli": {
        "router", "docker", "k8s", "ipam", "gossip", "hostport", "errors", "jsonlimit",
        "atomicfile",
    },
}

# sans-I/O modules: no sockets, event loop, threads, netlink, subprocesses or clocks
PURE = [
    "weft.sleeve.core", "weft.sleeve.gro", "weft.sleeve.maccache", "weft.switch.core",
    "weft.gossip.admission", "weft.gossip.channel", "weft.gossip.connection_maker",
    "weft.gossip.crypto",
    "weft.gossip.handshake", "weft.gossip.mesh", "weft.gossip.peer", "weft.gossip.routes",
    "weft.gossip.session", "weft.gossip.topology", "weft.gossip.wire",
    "weft.ipam.ring", "weft.ipam.paxos", "weft.ipam.allocator", "weft.ipam.node",
    "weft.fastdp.fdb", "weft.fastdp.heartbeat", "weft.fastdp.link", "weft.fastdp.ovs_flows",
    "weft.policy.model", "weft.policy.compiler", "weft.policy.nft", "weft.policy.verdict",
    "weft.policy.explain",
    "weft.k8s.core",
]  # fmt: skip
IO_MODULES = {"asyncio", "socket", "select", "selectors", "threading", "subprocess", "time",
              "aiohttp", "pyroute2", "concurrent"}  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for path in WEFT.rglob("*.py"):
        parts = path.relative_to(WEFT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (absolute names; weft modules resolved to the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found


def _weft_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for imported in _imports(name, path):
            while imported and imported not in MODULES:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported.startswith("weft"):
                targets.add(imported)
        edges[name] = targets
    return edges


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_rules_name_every_package() -> None:
    packages = {_package(m) for m in MODULES} - {""}
    assert packages == set(ALLOWED), "add the new package to ALLOWED and weft/__init__.py"


def test_dependencies_point_one_way() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _weft_edges().items()
        for target in targets
        if _package(module) and _package(target)  # the root holds only __version__
        and _package(target) != _package(module)
        and _package(target) not in ALLOWED[_package(module)]
    )  # fmt: skip
    assert wrong == []


def test_the_allowed_graph_has_no_circle() -> None:
    seen: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(pkg: str, trail: list[str]) -> None:
        assert seen.get(pkg) != 1, f"circle in ALLOWED: {' -> '.join([*trail, pkg])}"
        if seen.get(pkg) == 2:
            return
        seen[pkg] = 1
        for dep in ALLOWED[pkg]:
            visit(dep, [*trail, pkg])
        seen[pkg] = 2

    for pkg in ALLOWED:
        visit(pkg, [])


def test_no_module_imports_in_a_circle() -> None:
    edges = _weft_edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan: strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    assert circles == []


@pytest.mark.parametrize("module", PURE)
def test_protocol_cores_do_no_io(module: str) -> None:
    imported = {m.split(".")[0] for m in _imports(module, MODULES[module])}
    assert imported & IO_MODULES == set()


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The import reader sees what the checks rely on: a function-level and a TYPE_CHECKING
    import, and a relative one."""
    src = tmp_path / "mod.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from weft.router.router import Router\n"
        "def f():\n    import asyncio\n"
        "from . import errors\n"
    )
    found = _imports("weft.fake", src)
    assert {"weft.router.router", "asyncio", "weft.errors"} <= found
