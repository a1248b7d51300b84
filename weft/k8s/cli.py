"""``weft router --k8s``: the command-line options and how they become a K8sConfig.

For the daemon's composition (the lead's ``weft router``)::

    add_k8s_arguments(parser)                     # when building the router's parser
    k8s = k8s_config_from_args(args, port)        # None without --k8s
    if k8s: config = replace(config, name=peer_name_for_node(k8s.node_name))
    ...
    if k8s: setup_k8s(router, ipam_service, k8s)  # before router.start()
"""

from __future__ import annotations

import argparse
import os

from weft.errors import ConfigError
from weft.k8s.core import K8sConfig

__all__ = ["add_k8s_arguments", "k8s_config_from_args"]

NODE_ENV = "NODE_NAME"


def add_k8s_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Kubernetes")
    group.add_argument("--k8s", action="store_true",
                       help="peers are the cluster's nodes (InternalIP), followed through the API;"
                            " deleted nodes' IPAM space is reclaimed automatically")
    group.add_argument("--k8s-node-name", metavar="NAME",
                       help=f"this router's node (default ${NODE_ENV}, from spec.nodeName)")
    group.add_argument("--k8s-api", metavar="URL",
                       help="API server URL (default: in-cluster service account)")
    group.add_argument("--kubeconfig", metavar="FILE",
                       help="read the API server and credentials from this kubeconfig")
    group.add_argument("--k8s-label-selector", metavar="SELECTOR",
                       help="only nodes matching this label selector are peers")
    group.add_argument("--no-network-policy", action="store_true",
                       help="do not enforce Kubernetes NetworkPolicy (on by default with --k8s;"
                            " needs nft and br_netfilter)")


def k8s_config_from_args(args: argparse.Namespace, port: int) -> K8sConfig | None:
    """The K8sConfig for ``--k8s`` (None without it); ConfigError names a missing node name."""
    if not getattr(args, "k8s", False):
        return None
    node = args.k8s_node_name or os.environ.get(NODE_ENV, "")
    if not node:
        raise ConfigError(
            f"--k8s needs the node name: --k8s-node-name or ${NODE_ENV} (the DaemonSet sets it"
            " from spec.nodeName)"
        )
    return K8sConfig(
        node_name=node,
        port=port,
        api_url=args.k8s_api or None,
        kubeconfig=args.kubeconfig or None,
        label_selector=args.k8s_label_selector or None,
        network_policy=not getattr(args, "no_network_policy", False),
    )
