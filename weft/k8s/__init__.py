"""Kubernetes: ``--k8s`` peer discovery from the node list, and reclaim of deleted nodes' space.

Decisions in weft/k8s/core.py (no I/O); the API client loop in weft/k8s/discovery.py.
"""
