"""CNI: the plugin a runtime executes, and the router's side of it.

* :mod:`weft.cni.plugin` — the plugin (spec 0.3.0-1.1.0): checks input, talks to the router,
  prints spec-shaped results and errors.
* :mod:`weft.cni.server` — the router's CNI service: the /cni routes, allocation through IPAM,
  kernel work through ``weft.host.attach`` (its AttachError becomes the spec's error code here).
* :mod:`weft.cni.shim_server` — the compiled shim's socket (fd passing; 0600).
* :mod:`weft.cni.install`, :mod:`weft.cni.ipam_adapter` — installation, the IPAM seam.

May import ``weft.host``, ``weft.errors``, ``weft.jsonlimit``; never the daemon.
"""
