"""The web topology visualiser and the router's Prometheus metrics.

* :mod:`weft.ui.server` — ``setup_routes`` (``/ui``, ``/ws``, ``/metrics``), ``StatusHub`` (live
  status pushes, coalesced), ``refuse_cross_site`` (middleware for the API's mutating routes).
* :mod:`weft.ui.metrics` — ``Metrics``: a per-router registry, series computed from the status
  model at scrape time plus counters the router's parts add.
* ``static/`` — the page (no build step, no library: graph.js draws on a canvas).
* :mod:`weft.ui.synthetic`, :mod:`weft.ui.devserver`, :mod:`weft.ui.headless` — synthetic
  meshes, a router-less status server and the Chromium launcher for tests and the benchmark.
"""
