"""Averaging: matchmaking, span partition, all-reduce, aggregation, compression and scoring.

The modules here that do arithmetic or bookkeeping (``partition``, ``aggregation``,
``compression``, ``scoring``) are sans-IO: no sockets, no trio, no torch; numpy is the tensor
library.
"""
