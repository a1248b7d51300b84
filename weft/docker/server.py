"""HTTP side of the Docker plugin: ``POST /<Method>`` on ``/run/docker/plugins/<name>.sock``.

Docker's plugin client posts JSON (``application/vnd.docker.plugins.v1.2+json``; ``null`` for
methods without arguments) and reads any reply with an ``Err`` field as a failure, whatever the
status; we answer 400 for a malformed request and 500 for a failure, both ``{"Err": "..."}``
naming the problem, and 200 with the method's object otherwise.

Composition (the lead's daemon): ``setup_docker_plugin(router, ipam, config, mtu=...)`` before
``router.start()``: the plugin's socket opens when the router's app starts and closes with it,
and ``/status`` gains a ``docker`` object.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any, Final, Protocol

from aiohttp import web

from weft import jsonlimit
from weft.cni.server import CniIpam
from weft.docker.plugin import DockerPlugin, DockerPluginConfig, EndpointKernel
from weft.errors import ConfigError, WeftError

__all__ = ["CONTENT_TYPE", "DockerPluginServer", "make_app", "setup_docker_plugin"]

log = logging.getLogger("weft.docker")


class Router(Protocol):
    """What the plugin uses of weft.router.router.Router (a Protocol: the daemon composes this
    package, so this package does not import the daemon)."""

    app: web.Application

    def add_status_provider(self, key: str, fn: Callable[[], Any]) -> None: ...

CONTENT_TYPE: Final = "application/vnd.docker.plugins.v1.2+json"
MAX_BODY: Final = 1 << 20


def _reply(obj: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(obj), status=status, content_type=CONTENT_TYPE)


def make_app(plugin: DockerPlugin) -> web.Application:
    """The aiohttp app answering Docker's plugin calls for ``plugin``."""

    async def handle(request: web.Request) -> web.Response:
        method = request.match_info["method"]
        raw = await request.content.read(MAX_BODY + 1)
        try:
            if len(raw) > MAX_BODY:
                raise ConfigError(f"request body over {MAX_BODY} bytes")
            try:
                body = jsonlimit.loads(raw) if raw.strip() else None
            except ValueError as err:
                raise ConfigError(f"request body is not JSON ({err})") from None
            if body is None:
                body = {}
            if not isinstance(body, dict):
                raise ConfigError("request body must be a JSON object")
            answer = await plugin.call(method, body)
        except ConfigError as err:
            log.info("docker %s refused: %s", method, err)
            return _reply({"Err": f"{method}: {err}"}, 400)
        except WeftError as err:
            log.warning("docker %s failed: %s", method, err)
            return _reply({"Err": f"{method}: {err}"}, 500)
        except Exception as err:
            log.exception("docker %s crashed", method)
            return _reply({"Err": f"{method}: internal error: {type(err).__name__}: {err}"}, 500)
        return _reply(answer)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/{method}", handle)
    return app


def _answers(path: str) -> bool:
    """True when something accepts connections on the unix socket ``path`` (a live plugin)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(path)
    except OSError:
        return False
    finally:
        sock.close()
    return True


class DockerPluginServer:
    """The plugin's app on its unix socket; ``start``/``stop`` are idempotent."""

    def __init__(self, plugin: DockerPlugin) -> None:
        self.plugin = plugin
        self._runner: web.AppRunner | None = None

    @property
    def path(self) -> str:
        return str(self.plugin.config.socket_path)

    async def start(self) -> None:
        if self._runner is not None:
            return
        path = self.path
        if _answers(path):
            raise ConfigError(
                f"another process serves the Docker plugin socket {path}; stop it or choose"
                " another plugin name"
            )
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale socket from an earlier router
        except OSError as err:
            raise ConfigError(f"cannot prepare the Docker plugin socket {path}: {err}") from None
        await self.plugin.start()
        runner = web.AppRunner(make_app(self.plugin), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.UnixSite(runner, path).start()
        except OSError as err:
            await runner.cleanup()
            raise ConfigError(f"cannot serve the Docker plugin on {path}: {err}") from None
        self._runner = runner
        log.info("docker plugin %r listening on %s", self.plugin.config.name, path)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await runner.cleanup()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def setup_docker_plugin(
    router: Router,
    ipam: CniIpam,
    config: DockerPluginConfig | None = None,
    *,
    mtu: Callable[[], int | None] = lambda: None,
    kernel: EndpointKernel | None = None,
) -> DockerPluginServer:
    """Serve the Docker plugin alongside ``router`` (call before ``router.start()``).

    ``ipam``: the router's allocator behind the CNI interface (with ``claim`` for
    ``docker run --ip``); ``mtu``: the container MTU of the data path (None: the bridge's).
    """
    if kernel is None:
        from weft.docker.kernel import HostKernel

        kernel = HostKernel()
    plugin = DockerPlugin(ipam, kernel, config, mtu)
    server = DockerPluginServer(plugin)

    async def on_startup(app: web.Application) -> None:
        del app
        await server.start()

    async def on_cleanup(app: web.Application) -> None:
        del app
        await server.stop()

    router.app.on_startup.append(on_startup)
    router.app.on_cleanup.append(on_cleanup)
    router.add_status_provider("docker", plugin.status)
    return server
