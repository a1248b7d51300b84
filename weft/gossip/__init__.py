"""The mesh protocol, sans I/O: peer names, handshake, sessions, topology, routes, gossip.

Everything here takes bytes and ``now`` and returns bytes, events and deadlines; the daemon
(``weft.router``) pumps it. Imports only ``weft.errors``.
"""
