"""
Fan-out: each change feed event to every watch stream of a matching prefix,
encoded once and written once per stream per reactor turn.

The feed calls a prefix's Fanout once per event (its one subscriber for all
the prefix's streams, so an event costs a dict lookup per prefix length in
use, never a call per watcher). The Fanout only queues the event; one
callLater(0) per turn then flushes every Fanout with events: the turn's SSE
frames joined once, framed as one HTTP chunk once, and that same bytes object
written to each stream's connection. A write is acknowledged before any of
this runs (the flush is a later turn of the reactor), and however many
events a committer batch or a turn holds, a watcher costs one socket write.

Pacing. A flush to a thousand sockets takes milliseconds of the one reactor
thread (about 1 us of Python and 4 us of kernel per socket, whatever the
chunk, plus ~0.2 ns a byte); flushed every turn under a steady stream of
writes, it would leave the writers little else. So after a flush that took T
of CPU time, the next one waits PACE x T if the node was busy with other
work (its writers) all the time since the last flush, PACE_IDLE x T if it was
idle, in proportion between, and never more than PACE_MAX: under load each
flush carries more events for the same one write per watcher, and what is
left is the kernel's cost per byte; with nothing else to do, events go out
sooner. An event waits at most PACE_MAX plus a flush. T and the busy share
are the thread's CPU time (which includes the loopback's softirq work done
in the send), not the clock's, so a node preempted by its neighbours does not
wait longer for it; a flush under PACE_FROM (a few watchers) never delays the
next. The sends happen in the flush itself (DacheChannel.write_through, not
through the Outbox at the end of the turn), so T is what they cost.

A stream that cannot take the shared chunk as it is (its client is not
reading, an engine replay is under way, it joined mid-turn or answers a
HEAD) is handed the events themselves (Stream.take), which keeps the
slow-reader bound and the exactly-once filter per stream.
"""

from __future__ import annotations

from time import thread_time
from typing import TYPE_CHECKING, Any

from twisted.web.http import toChunk

from dache.store.changes import ChangeFeed, Event

if TYPE_CHECKING:
    from dache.web.watch import Stream

PACE = 4.0  # a busy node: after a flush that took T, the next waits PACE x T (at most PACE_MAX)
PACE_IDLE = 0.25  # a node with nothing else to do: the next waits PACE_IDLE x T (latency)
PACE_FROM = 0.0002  # seconds of CPU a flush takes before it delays the next (~30 watchers)
PACE_MAX = 0.025  # seconds: the longest an event waits for pacing


def chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked HTTP/1.1 body."""
    return b"".join(toChunk(data))


class Fanout:
    """The open streams of one prefix, and the events of this turn not yet written."""

    __slots__ = ("fanouts", "prefix", "streams", "events", "token")

    def __init__(self, fanouts: Fanouts, prefix: str):
        self.fanouts = fanouts
        self.prefix = prefix
        self.streams: dict[Stream, None] = {}  # insertion-ordered set
        self.events: list[Event] = []
        self.token = 0

    def deliver(self, event: Event) -> None:
        """The feed's subscriber: queue the event for this turn's flush."""
        events = self.events
        if not events:
            self.fanouts.flush_later(self)
        events.append(event)

    def flush(self) -> int:
        """Write the turn's events to every stream; the number of events sent."""
        events, self.events = self.events, []
        if not events or not self.streams:
            return 0
        data = b"".join([event.sse() for event in events])
        framed = chunk(data)
        plain = 0
        sent = 0
        for stream in list(self.streams):
            if stream.plain:  # the shared chunk, as is: one write, no per-event work
                stream.channel.write_through(framed)
                plain += 1
            else:
                sent += stream.take(events, data)
        return sent + plain * len(events)


class Fanouts:
    """A node's Fanouts by prefix, and the one flush per reactor turn."""

    def __init__(self, feed: ChangeFeed, clock: Any):
        self.feed = feed
        self.clock = clock
        self.by_prefix: dict[str, Fanout] = {}
        self.events_sent = 0  # one per event per watcher
        self.flushes = 0  # reactor turns that wrote events
        self._dirty: list[Fanout] = []
        self._flushing: Any = None
        self._next_flush = 0.0  # clock.seconds() before which no flush starts (PACE)
        self._last_end: tuple[float, float] | None = None  # (clock, CPU time) the last flush ended
        self.cpu_time = thread_time  # what a flush took (tests give their own)

    def join(self, stream: Stream) -> Fanout:
        """Add a stream to its prefix's Fanout (subscribing the prefix if it is new)."""
        fanout = self.by_prefix.get(stream.prefix)
        if fanout is None:
            fanout = self.by_prefix[stream.prefix] = Fanout(self, stream.prefix)
            fanout.token = self.feed.subscribe(stream.prefix, fanout.deliver)
        fanout.streams[stream] = None
        # Events queued this turn were released before the stream began: its
        # replay (or its starting revision) already covers them.
        stream.skip = len(fanout.events)
        return fanout

    def leave(self, stream: Stream) -> None:
        fanout = self.by_prefix.get(stream.prefix)
        if fanout is None or stream not in fanout.streams:
            return
        del fanout.streams[stream]
        if not fanout.streams:
            del self.by_prefix[stream.prefix]
            self.feed.unsubscribe(stream.prefix, fanout.token)

    def flush_later(self, fanout: Fanout) -> None:
        self._dirty.append(fanout)
        if self._flushing is None:
            wait = self._next_flush - self.clock.seconds()
            self._flushing = self.clock.callLater(wait if wait > 0 else 0, self.flush)

    def flush(self) -> None:
        """Write every queued event now (also before a reset or a shutdown)."""
        if self._flushing is not None:
            if self._flushing.active():
                self._flushing.cancel()
            self._flushing = None
        dirty, self._dirty = self._dirty, []
        if not dirty:
            return
        self.flushes += 1
        now, began = self.clock.seconds(), self.cpu_time()
        busy = self._busy(now, began)
        for fanout in dirty:
            self.events_sent += fanout.flush()
        ended = self.cpu_time()
        self._last_end = (self.clock.seconds(), ended)
        took = ended - began
        if took >= PACE_FROM:
            pace = PACE_IDLE + (PACE - PACE_IDLE) * busy
            self._next_flush = self.clock.seconds() + min(pace * took, PACE_MAX)

    def _busy(self, now: float, cpu: float) -> float:
        """
        The share of the time since the last flush ended that the node spent
        on other work (its writers), 0 to 1; 1 when there is no such time
        to go by (the first flush, or one in the same instant as the last).
        """
        if self._last_end is None:
            return 1.0
        then, cpu_then = self._last_end
        if now <= then:
            return 1.0
        return min(max((cpu - cpu_then) / (now - then), 0.0), 1.0)
