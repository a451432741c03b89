"""When a connection is read: its flow control, apart from its frames and answers.

Like uvicorn's `FlowControl`, one object holds the transport's reading and
writing state; here it also holds what decides it: the bytes of request
bodies the connection holds (its calls' and the reservation of the frame
being received) against the connection's and the daemon's budgets, and the
two clocks of a frame being received (its stall, its reservation's lapse).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pair.protocol.framing import FrameDecoder

if TYPE_CHECKING:
    from pair.protocol.connection import Connection
    from pair.protocol.host import CallHost, ServerLimits

# A frame body that sends nothing for this long loses its reservation of the budgets.
RESERVATION_IDLE = 1.0


class ReadGate:
    """Whether a connection's peer is read, and why not.

    Reading pauses while the answers cannot be written (`write_paused`), while
    the connection is `busy` (frames wait for a slot of `max_in_flight`), or
    while the bodies it holds are over a budget, unless a frame is being
    received: a frame already admitted is always read to its end, so nothing
    waits on itself.
    """

    __slots__ = (
        "_budget",
        "_decoder",
        "_lapse_timer",
        "_limits",
        "_log",
        "_loop",
        "_reader",
        "_stall_timer",
        "_transport",
        "closed",
        "pending_bytes",
        "read_paused",
        "reserved",
        "write_paused",
    )

    def __init__(
        self,
        reader: Connection,
        budget: CallHost,
        limits: ServerLimits,
        decoder: FrameDecoder,
        log: logging.Logger,
    ) -> None:
        self._reader = reader
        self._budget = budget
        self._limits = limits
        self._decoder = decoder
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.read_paused = False
        self.write_paused = False
        self.closed = False
        # Request bodies held: the calls in flight and `reserved`, the declared length
        # of the admitted frame being received.
        self.pending_bytes = 0
        self.reserved = 0
        self._stall_timer: asyncio.TimerHandle | None = None
        self._lapse_timer: asyncio.TimerHandle | None = None

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def pause_writing(self) -> None:
        """The transport's buffer is full: the answers wait, and so does reading."""
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    def charge(self, size: int) -> None:
        """A call of `size` body bytes started: held until `release`."""
        self.pending_bytes += size

    def release(self, size: int) -> None:
        self.pending_bytes -= size

    def update(self, busy: bool) -> None:
        """Pause or resume reading."""
        transport = self._transport
        if transport is None or self.closed:
            return
        blocked = self.write_paused or busy or (not self.reserved and not self.within_budget())
        if blocked and not self.read_paused:
            self.read_paused = True
            transport.pause_reading()
            # A sender we are not reading from is not stalling: stop its clock. Unless
            # it is the one not reading (our answers back up) halfway through a frame
            # whose length is reserved: that would hold the reservation for ever.
            if not (self.write_paused and self.reserved):
                self.cancel_stall()
        elif not blocked and self.read_paused:
            self.read_paused = False
            transport.resume_reading()
            # Before the next starved connection is looked at: this one's frame counts.
            self.admit_frame_in_progress()
            self.watch_stall(True)

    def within_budget(self) -> bool:
        return self.pending_bytes < self._limits.max_pending_bytes and self._budget.may_read(
            self._reader
        )

    def admit_frame_in_progress(self) -> None:
        """Reserve the declared length of the frame being received once its body starts to
        arrive, if the budgets allow it (otherwise reading pauses in `update` until they
        do); release the reservation of a frame that has been received.

        A header alone reserves nothing, and a body that stops coming loses its
        reservation after `RESERVATION_IDLE` (`_lapse`): nine peers that each sent a
        16 MiB header, or a header and a byte, held the daemon's whole budget, and every
        other connection was read once a `frame_timeout`.
        """
        decoder = self._decoder
        declared = decoder.partial_length if decoder.partial_received else 0
        if declared == self.reserved:
            return
        if self.reserved:
            self._reserve(0)
        if declared and self.within_budget():
            self._reserve(declared)
            if self._lapse_timer is None:
                self._lapse_timer = self._loop.call_later(RESERVATION_IDLE, self._lapse)

    def _lapse(self) -> None:
        """A reserved body that sent nothing for `RESERVATION_IDLE` gives its budget back;
        its next bytes must be admitted again."""
        self._lapse_timer = None
        if not self.reserved or self.closed:
            return
        idle = self._loop.time() - self._reader.last_active
        if self.read_paused:
            # Not read from by our choice: its silence is ours. Looked at again later.
            self._lapse_timer = self._loop.call_later(RESERVATION_IDLE, self._lapse)
            return
        if idle < RESERVATION_IDLE:
            self._lapse_timer = self._loop.call_later(RESERVATION_IDLE - idle, self._lapse)
            return
        self._log.info("peer %s sent nothing of its frame for %.1fs: its reservation is released",
                       self._reader.peer, RESERVATION_IDLE)  # fmt: skip
        self._reserve(0)

    def _reserve(self, size: int) -> None:
        if size != self.reserved:
            self.pending_bytes += size - self.reserved
            self._budget.hold(size - self.reserved)
            self.reserved = size

    def watch_stall(self, frame_completed: bool) -> None:
        """Run the `frame_timeout` clock while a frame is half received and being read;
        restart it when a frame completed."""
        if not self._decoder.has_partial or self.read_paused:
            self.cancel_stall()
            return
        if self._stall_timer is None or frame_completed:
            self.cancel_stall()
            self._stall_timer = self._loop.call_later(self._limits.frame_timeout, self._stalled)

    @property
    def stall_watched(self) -> bool:
        return self._stall_timer is not None

    def cancel_stall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self) -> None:
        self._stall_timer = None
        self._log.warning(
            "peer %s stalled mid-frame for %.1fs; disconnecting",
            self._reader.peer,
            self._limits.frame_timeout,
        )
        self._reader.close()

    def lost(self) -> None:
        """The connection is gone: its reservation and clocks with it."""
        self.closed = True
        self._reserve(0)
        self.cancel_stall()
        if self._lapse_timer is not None:
            self._lapse_timer.cancel()
            self._lapse_timer = None
