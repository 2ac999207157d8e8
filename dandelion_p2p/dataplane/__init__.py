"""The bulk data plane: sealed, credit-controlled channels between two peers.

Sessions are agreed over an authenticated libp2p stream; frames then travel over a plain TCP
connection sealed with AES-256-GCM, or over the libp2p stream itself where neither peer can be
dialed. See ``protocol/dataplane.md``.

The protocol cores (``messages``, ``sealing``, ``flow``, ``errors``) import no I/O library;
the adapters (``session``, ``channel``, ``service``) are imported from their own modules.
"""
