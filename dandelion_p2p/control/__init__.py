"""The local control socket: how command-line tools, the web UI and the worker talk to a
running daemon (spec: protocol/control.md).

A Unix stream socket in the data directory carries length-prefixed msgpack frames of the
``control`` wire family. A client sends a ``Request``; the daemon answers each with one
``Response``, in order, and several requests may follow each other on one connection. A frame
the daemon cannot accept is answered with a ``Reject`` and the connection is closed.

``protocol`` is the sans-IO core (messages, both ends as bytes in, bytes out); ``server`` and
``client`` run it over a trio Unix socket.
"""
