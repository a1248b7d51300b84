"""`weft router`/`launch` options that compose the Docker plugin and Kubernetes mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from weft.cli.main import build_parser, config_from_args
from weft.errors import ConfigError


def _config(tmp_path: Path, *argv: str) -> object:
    args = build_parser().parse_args(["router", "--data-dir", str(tmp_path), *argv])
    return config_from_args(args)


def test_docker_plugin_off_by_default_and_configured_by_flag(tmp_path: Path) -> None:
    from weft.router.config import RouterConfig

    plain = _config(tmp_path)
    assert isinstance(plain, RouterConfig) and plain.docker_plugin is None and plain.k8s is None
    cfg = _config(
        tmp_path,
        "--docker-plugin",
        "--docker-plugin-dir",
        "/tmp/p",
        "--ipalloc-range",
        "10.9.0.0/16",
    )
    assert isinstance(cfg, RouterConfig) and cfg.docker_plugin is not None
    assert cfg.docker_plugin.name == "weft"
    assert cfg.docker_plugin.socket_dir == Path("/tmp/p")
    assert cfg.docker_plugin.state_path == tmp_path / "docker-networks.json"  # survives restarts
    assert cfg.docker_plugin.default_pool == "10.9.0.0/16"


def test_k8s_needs_a_node_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from weft.router.config import RouterConfig

    monkeypatch.delenv("NODE_NAME", raising=False)
    with pytest.raises(ConfigError, match="node name"):
        _config(tmp_path, "--k8s")
    monkeypatch.setenv("NODE_NAME", "node-a")
    cfg = _config(tmp_path, "--k8s", "--port", "7000")
    assert isinstance(cfg, RouterConfig) and cfg.k8s is not None
    assert cfg.k8s.node_name == "node-a" and cfg.k8s.port == 7000
