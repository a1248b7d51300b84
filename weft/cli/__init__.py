"""The `weft` command line (``weft.cli.main:main``), `weft demo` and the status text.

Owns argument parsing, the client side of the HTTP API and the formatting of what it returns.
May import anything below it (``weft.router`` to run a router in the foreground, ``weft.docker``,
``weft.k8s``, ``weft.ipam``, ``weft.gossip``); nothing imports it.
"""
