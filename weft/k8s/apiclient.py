"""LIST and WATCH through kubernetes_asyncio as plain JSON, shared by node discovery and the
NetworkPolicy follower (one client configuration, one way to read answers and errors)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from weft.errors import ConfigError, RemoteProtocolError

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

    from weft.k8s.core import K8sConfig

__all__ = ["failure_reason", "get_object", "list_objects", "make_api_client", "watch_objects"]


async def make_api_client(config: K8sConfig) -> ApiClient:
    """A client for ``--k8s-api`` / ``--kubeconfig`` / the in-cluster service account."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio import config as kconfig

    cfg = client.Configuration()
    try:
        if config.api_url:
            cfg.host = config.api_url
        elif config.kubeconfig:
            await kconfig.load_kube_config(
                config_file=config.kubeconfig, client_configuration=cfg
            )
        else:
            kconfig.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except (kconfig.ConfigException, OSError) as err:
        raise ConfigError(
            f"--k8s: no Kubernetes API configuration ({err}); run inside a pod with a"
            " service account, or give --k8s-api / --kubeconfig"
        ) from None
    return client.ApiClient(configuration=cfg)


def failure_reason(err: Exception) -> str | None:
    """Why a LIST or WATCH failed, for the logs and the backoff; None for 410 Gone (our
    resourceVersion is too old: list again at once, it is no failure)."""
    from kubernetes_asyncio.client import ApiException

    if isinstance(err, ApiException):
        return None if err.status == 410 else f"HTTP {err.status} {err.reason}".strip()
    if isinstance(err, TimeoutError | aiohttp.ClientError | OSError):
        return f"{type(err).__name__}: {err}".rstrip(": ")
    if isinstance(err, ValueError | KeyError | TypeError | RemoteProtocolError):
        return f"unexpected answer from the API server: {err}"
    return f"{type(err).__name__}: {str(err)[:200]}"  # the client library's own errors


async def _read(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call one API method with the raw answer; JSON back, ApiException on a non-200."""
    from kubernetes_asyncio.client import ApiException

    resp = await call(*args, _preload_content=False, **kwargs)
    try:
        raw = await resp.read()
    finally:
        resp.release()
    if resp.status != 200:
        reason = resp.reason or ""
        with contextlib.suppress(ValueError, AttributeError):
            status = json.loads(raw)  # a Status object: {"reason", "message", "code"}
            reason = f"{status.get('reason') or reason}: {status.get('message')}"
        raise ApiException(status=resp.status, reason=reason)
    return json.loads(raw)


async def list_objects(
    call: Callable[..., Any], list_kind: str, request_timeout: float, **kwargs: Any
) -> tuple[list[Any], str]:
    """LIST: (items, resourceVersion); RemoteProtocolError unless the answer is a ``list_kind``."""
    doc = await _read(call, _request_timeout=request_timeout, **kwargs)
    if not isinstance(doc, dict) or doc.get("kind") not in (None, list_kind):
        raise RemoteProtocolError(f"the LIST did not return a {list_kind}")
    items = doc.get("items") or []
    if not isinstance(items, list):
        raise RemoteProtocolError(f"{list_kind}.items is not a list")
    version = (doc.get("metadata") or {}).get("resourceVersion")
    return items, str(version or "")


async def get_object(
    call: Callable[..., Any], *args: Any, request_timeout: float
) -> dict[str, Any]:
    doc = await _read(call, *args, _request_timeout=request_timeout)
    if not isinstance(doc, dict):
        raise RemoteProtocolError("a GET did not return an object")
    return doc


@contextlib.asynccontextmanager
async def watch_objects(
    call: Callable[..., Any], version: str, watch_timeout: int, request_timeout: float,
    **kwargs: Any,
) -> AsyncIterator[AsyncIterator[tuple[str, Any]]]:
    """WATCH from ``version``: (type, object) pairs until the server ends the watch. A 410 Gone
    (or an ERROR event carrying it) raises ApiException(410): list again."""
    from kubernetes_asyncio.watch import Watch

    args: dict[str, Any] = {
        "timeout_seconds": watch_timeout,
        "allow_watch_bookmarks": True,
        "_request_timeout": watch_timeout + request_timeout,
        **kwargs,
    }
    if version:
        args["resource_version"] = version

    async def events(stream: Any) -> AsyncIterator[tuple[str, Any]]:
        async for event in stream:
            if not isinstance(event, dict):
                raise RemoteProtocolError("a watch event is not a JSON object")
            yield str(event.get("type")), event.get("raw_object")

    # return_type "object": events carry the object as plain JSON (no model classes)
    async with Watch(return_type="object").stream(call, **args) as stream:
        yield events(stream)
