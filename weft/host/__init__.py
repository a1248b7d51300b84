"""The host side of the data plane: the ``weft`` bridge and containers' interfaces on it.

* :mod:`weft.host.bridge` — the bridge, the router's TAP on it, ``weft expose`` and attach.
* :mod:`weft.host.attach` — veth pairs into a container's network namespace (CNI, Docker);
  failures are :class:`weft.host.attach.AttachError`, which each caller's boundary converts.
* :mod:`weft.host.bridge_api` — the HTTP routes for the bridge (/expose, /attach, /ps, ...).

Kernel helpers only: may import ``weft.errors`` and ``weft.jsonlimit``, nothing else of weft.
"""
