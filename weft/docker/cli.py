"""``weft router --docker-plugin``: the command-line options and the DockerPluginConfig.

For the daemon's composition (the lead's ``weft router``)::

    add_docker_arguments(parser)
    docker = docker_config_from_args(args, data_dir, default_pool)   # None when off
    if docker: setup_docker_plugin(router, cni_ipam, docker, mtu=...)  # before router.start()
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the plugin pulls in aiohttp; `weft status` must not pay for it
    from weft.docker.plugin import DockerPluginConfig

__all__ = ["add_docker_arguments", "docker_config_from_args"]

STATE_FILE = "docker-networks.json"


def add_docker_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Docker")
    group.add_argument(
        "--docker-plugin",
        nargs="?",
        const="weft",
        metavar="NAME",
        help="serve the Docker network and IPAM plugin NAME (default weft) on"
        " /run/docker/plugins/NAME.sock",
    )
    group.add_argument(
        "--docker-plugin-dir",
        default="/run/docker/plugins",
        metavar="DIR",
        help="where dockerd looks for plugin sockets",
    )


def docker_config_from_args(
    args: argparse.Namespace,
    data_dir: Path,
    default_pool: str = "10.32.0.0/12",
    bridge: str = "weft",
) -> DockerPluginConfig | None:
    """The plugin's config (networks kept in ``data_dir``), None without ``--docker-plugin``."""
    name = getattr(args, "docker_plugin", None)
    if not name:
        return None
    from weft.docker.plugin import DockerPluginConfig

    return DockerPluginConfig(
        name=name,
        socket_dir=Path(args.docker_plugin_dir),
        state_path=data_dir / STATE_FILE,
        bridge=bridge,
        default_pool=default_pool,
    )
