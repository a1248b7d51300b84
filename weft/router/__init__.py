"""The control daemon: one `weft router` process.

* :mod:`weft.router.router` — the Router: asyncio pumps around the sans-I/O mesh core, the control
  listener and dialer, the HTTP API's app.
* :mod:`weft.router.connection` — one control connection (handshake, session, framing).
* :mod:`weft.router.api` — the HTTP API routes of the router itself.
* :mod:`weft.router.config` — RouterConfig and its parsing.
* :mod:`weft.router.daemon`, :mod:`weft.router.components` — the composition of the data plane
  (the overlay switch, loaded by name), IPAM, CNI, Docker, Kubernetes and the UI into one router.

May import every package below it; only ``weft.cli`` imports it.
"""
