"""Kubernetes NetworkPolicy (networking.k8s.io/v1), the pure layer: no I/O anywhere in here.

* :mod:`weft.policy.model` — the cluster view (namespaces, pods, policies) parsed from the API's
  JSON, label selectors.
* :mod:`weft.policy.compiler` — cluster view + this node -> the desired enforcement state for this
  node's pods (sets of allowed address/protocol/port tuples, isolated pods).
* :mod:`weft.policy.nft` — that state as one atomic nftables script.
Not built yet (issue #16): ``weft policy explain`` (it will read the compiler's grants), the
reconciler that watches the API server and applies the script, and docs/NETWORKPOLICY.md.
"""
