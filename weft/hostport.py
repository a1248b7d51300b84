"""Host:port text and weft's well-known control port, shared by the daemon's configuration
(weft/router/config.py) and Kubernetes discovery (weft/k8s/), which names peers by node address.
A leaf: imports nothing of weft."""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_PORT", "format_hostport"]

DEFAULT_PORT: Final = 6783  # TCP control connections and the sleeve's UDP


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (``[fd00::2]:6783``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
