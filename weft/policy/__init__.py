"""Kubernetes NetworkPolicy (networking.k8s.io/v1); pure but for the thin I/O edges below.

* :mod:`weft.policy.model` — the cluster view (namespaces, pods, policies) parsed from the API's
  JSON, label selectors.
* :mod:`weft.policy.compiler` — cluster view + this node -> the desired enforcement state for this
  node's pods (sets of allowed address/protocol/port tuples, isolated pods).
* :mod:`weft.policy.nft` — that state as one atomic nftables script (with counters and a
  rate-limited NFLOG copy of denied packets).
* :mod:`weft.policy.nflog` — NFLOG datagrams -> denied packets (parser; plus a thin socket reader).
* :mod:`weft.policy.denied` — denied packets -> the bounded ring of recent denied flows.
* :mod:`weft.policy.counters` — ``nft -j`` counter listings -> numbers for /metrics (plus runners).
* :mod:`weft.policy.verdict` — the kernel's reading of a desired state (conntrack cuts, tests).
* :mod:`weft.policy.reconcile` — the cache and the level-triggered reconciler (asyncio; its
  API follower is weft/k8s/netpol.py). docs/NETWORKPOLICY.md says what is not built yet.
* :mod:`weft.policy.explain` — ``weft policy explain``: one flow's verdict and the policies and
  rules that decide it, read from the compiler's grants (so it cannot disagree with the kernel).
* :mod:`weft.policy.http` — the read routes ``/policy/explain``, ``/policy/status`` and
  ``/policy/denied`` (aiohttp) over a :class:`~weft.policy.http.PolicySource`; ``weft policy``
  (weft/cli/policy.py) renders them.
"""
