"""Averaging: matchmaking, span partition, all-reduce, aggregation, compression, reports.

The modules here that do arithmetic or bookkeeping (``partition``, ``aggregation``,
``compression``, ``group``, ``messages``, the all-reduce state machine) are sans-IO: no
sockets, no trio, no torch; numpy is the tensor library. Scores live in
``dandelion_p2p.reputation``.
"""
