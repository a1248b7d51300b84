"""weft: an encrypted mesh overlay network for containers.

The package tree is the architecture; dependencies point down this list, never up, and no module
imports another in a circle (tests/unit/test_layout.py checks both):

* ``weft.cli`` — the `weft` command line, `weft demo`, status formatting.
* ``weft.router`` — the control daemon: the Router (mesh, control connections, HTTP API) and the
  composition of all parts into one `weft router` process.
* ``weft.docker``, ``weft.k8s`` — integrations: Docker's network/IPAM plugins, Kubernetes
  discovery and node reclaim; both reach the host through ``weft.cni`` / ``weft.host``.
* ``weft.cni`` — the CNI plugin, the router's CNI service and the compiled shim's socket.
* ``weft.ui`` — the topology page, /ws, /metrics.
* ``weft.switch`` — the overlay switch: picks, per connection, the datapath that carries it.
* ``weft.sleeve`` — the userspace datapath (UDP encapsulation, TAP); every connection's fallback.
* ``weft.fastdp`` — the kernel fast datapaths (Linux VXLAN, Open vSwitch, ESP): the kernel
  mechanisms and their parts of the overlay switch.
* ``weft.host`` — the host side: the ``weft`` bridge, veth attachment into containers.
* ``weft.ipam`` — the distributed address allocator (ring CRDT, consensus, persistence).
* ``weft.overlay`` — the seam between the mesh and the data plane (Overlay, connection params).
* ``weft.gossip`` — the mesh protocol: handshake, sessions, topology, routes, gossip channels.
* ``weft.policy`` — Kubernetes NetworkPolicy: cluster model, compiler, nftables rendering.
* ``weft.errors``, ``weft.hostport``, ``weft.jsonlimit``, ``weft.atomicfile`` — leaves shared by
  all.

Protocol cores (``sleeve.core``, ``switch.core``, ``gossip.*``, the IPAM ring, ``policy.*``, ...)
do no I/O: bytes and ``now`` in, bytes, events and deadlines out.
"""

__version__ = "0.1.0"
