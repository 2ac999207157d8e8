"""The frames an all-reduce peer sends: chunks of its vector, results of its span, rejects.

``Framer`` builds them for one peer and one round, signs the headers and counts every frame's
bytes as the transport renders it; ``Send`` is what the state machine hands the transport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from dandelion_p2p.averaging.compression import BufferErrorFeedback, Codec
from dandelion_p2p.averaging.group import GroupSpec
from dandelion_p2p.averaging.messages import (
    UNSIGNED,
    Buffer,
    ChunkHeader,
    ResultEcho,
    ResultHeader,
    Signer,
    frame_size,
    pack_frame,
    payload_digest,
)
from dandelion_p2p.averaging.partition import Chunk
from dandelion_p2p.wire import Reject, RejectCode

SendKind = Literal["chunk", "result", "reject", "echo"]
MAX_REJECT_DETAIL = 512
MAX_RESENDS = 2
"""Times a member sends a peer again what a lost channel may not have delivered, per round
(protocol/averaging.md section 14.2); a receiver ignores that many duplicates of each frame
before it counts them as violations."""


class Send:
    """One frame for the transport to deliver to ``recipient``, in the order returned.

    Chunk frames are rendered (encoded, digested, signed) only when ``buffers()`` or
    ``frame()`` is called, so that a round over a multi-GB vector does not hold an encoded
    copy of it while the transport works through the queue: render each frame just before
    writing it, once. Result frames are rendered when the chunk is reduced and shared among
    their recipients.
    """

    __slots__ = ("_render", "_rerender", "chunk_index", "kind", "recipient", "span_index")

    def __init__(
        self,
        recipient: bytes,
        kind: SendKind,
        span_index: int,
        chunk_index: int,
        render: Callable[[], list[Buffer]],
        rerender: Callable[[], list[Buffer]] | None = None,
    ) -> None:
        self.recipient = recipient
        self.kind = kind
        self.span_index = span_index
        self.chunk_index = chunk_index
        self._render = render
        self._rerender = rerender

    def buffers(self) -> list[Buffer]:
        """The frame as buffers for a vectored write (see ``messages.pack_frame``)."""
        return self._render()

    def again(self) -> list[Buffer]:
        """The frame rendered once more, for a new channel after the first was lost: the
        same signed bytes, except a chunk under error feedback (encoded without it, so the
        residual does not count the values twice)."""
        return (self._rerender or self._render)()

    def frame(self) -> bytes:
        """The frame as one bytes object (a copy of the payload)."""
        return b"".join(self._render())

    def __repr__(self) -> str:
        return (
            f"Send({self.kind}, to={self.recipient[-4:].hex()}, span={self.span_index}, "
            f"chunk={self.chunk_index})"
        )


class Framer:
    """Builds one peer's frames for one round; ``count_sent`` is told the size of each frame
    every time the transport renders it."""

    def __init__(
        self,
        *,
        peer_id: bytes,
        sign: Signer,
        spec: GroupSpec,
        codec: Codec,
        buffer: NDArray[np.float32],
        error_feedback: BufferErrorFeedback | None,
        count_sent: Callable[[int], None],
    ) -> None:
        self._peer_id = peer_id
        self._sign = sign
        self._spec = spec
        self._codec = codec
        self._buffer = buffer
        self._error_feedback = error_feedback
        self._count_sent = count_sent

    def chunk(self, span_index: int, chunk: Chunk, recipient: bytes) -> Send:
        """Our values of ``chunk`` for the reducer of span ``span_index``, read from the
        buffer when the frame is rendered."""
        weight = self._spec.member(self._peer_id).weight

        def render(feedback: bool = True) -> list[Buffer]:
            values = self._buffer[chunk.start : chunk.end]
            payload = (
                self._codec.encode_view(values)
                if self._error_feedback is None or not feedback
                else self._error_feedback.encode(values, chunk.start)
            )
            header = ChunkHeader(
                run=self._spec.run,
                round=self._spec.round,
                group_id=self._spec.group_id,
                span_index=span_index,
                chunk_index=chunk.index,
                start=chunk.start,
                end=chunk.end,
                sender=self._peer_id,
                recipient=recipient,
                codec=self._codec.name,
                weight=weight,
                digest=payload_digest(payload),
                signature=UNSIGNED,
            ).signed_with(self._sign)
            buffers = pack_frame(header, payload)
            self._count_sent(frame_size(buffers))
            return buffers

        def rerender() -> list[Buffer]:
            return render(feedback=False)

        return Send(recipient, "chunk", span_index, chunk.index, render, rerender)

    def results(
        self,
        span_index: int,
        chunk: Chunk,
        contributors: tuple[bytes, ...],
        payload: Buffer,
        recipients: list[bytes],
    ) -> list[Send]:
        """The aggregate of ``chunk`` over ``contributors`` (encoded as ``payload``), signed
        now, as one frame shared by every recipient."""
        header = ResultHeader(
            run=self._spec.run,
            round=self._spec.round,
            group_id=self._spec.group_id,
            span_index=span_index,
            chunk_index=chunk.index,
            start=chunk.start,
            end=chunk.end,
            reducer=self._peer_id,
            contributors=contributors,
            weights=tuple(self._spec.member(p).weight for p in contributors),
            codec=self._codec.name,
            digest=payload_digest(payload),
            signature=UNSIGNED,
        ).signed_with(self._sign)
        render = self._shared(pack_frame(header, payload))
        return [Send(p, "result", span_index, chunk.index, render) for p in recipients]

    def echoes(self, result: Buffer, recipients: list[bytes]) -> list[Send]:
        """The encoded header of a result we applied, for the other members to compare; an
        empty ``result`` says we echo nothing more this round."""
        echo = ResultEcho(
            run=self._spec.run,
            round=self._spec.round,
            group_id=self._spec.group_id,
            final=not result,
        )
        render = self._shared(pack_frame(echo, result))
        return [Send(p, "echo", -1, -1, render) for p in recipients]

    def reject(self, peer: bytes, code: RejectCode, detail: str) -> Send:
        """The answer to a refused frame."""
        buffers = pack_frame(Reject(code=int(code), detail=detail[:MAX_REJECT_DETAIL]))
        return Send(peer, "reject", -1, -1, self._shared(buffers))

    def _shared(self, buffers: list[Buffer]) -> Callable[[], list[Buffer]]:
        size = frame_size(buffers)

        def render() -> list[Buffer]:
            self._count_sent(size)
            return buffers

        return render
