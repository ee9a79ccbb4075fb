"""
Watching changes over HTTP: a Server-Sent Events stream and blocking reads.

    GET /dache?watch=true&prefix=<p>&since=<revision>   (or Accept: text/event-stream)
    GET /dache/<key>?wait=<seconds>&revision=<n>

A stream first replays every kept change after `since` (or the Last-Event-ID
header an EventSource sends when it reconnects), then goes on live; the
replay and the subscription happen in one reactor turn, so there is no gap
and no duplicate. A `since` older than the kept history gets `event: reset`
(with the current revision as its id) first: the client re-lists and goes on.

A watcher that does not read: Twisted's transport pauses its producer (this
stream) once its own buffer is full; events then queue here, up to
WATCH_BUFFER bytes, and past that the watcher gets `event: error` and is
disconnected. Nothing runs for an idle stream but one shared heartbeat timer.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from dache.rendering import render_json
from dache.store.cache import Cache, body_of, etag_of, revision_of
from dache.store.changes import EVENT_EXPIRE, ChangeFeed, Event, publish_expiries
from dache.web.answer import JSON, APIError, error_body

EVENT_STREAM = b"text/event-stream"
MAX_WAIT = 300.0  # seconds a blocking read may wait
ABORT_AFTER = 5.0  # seconds a dropped watcher gets to take its last event


def wants_stream(request: IRequest) -> bool:
    """A watch: ?watch=true, or an EventSource's Accept: text/event-stream."""
    watch = request.args.get(b"watch")
    if watch:
        return watch[-1].lower() in (b"true", b"1", b"yes")
    return EVENT_STREAM in (request.getHeader(b"accept") or b"")


def _arg(request: IRequest, name: bytes) -> bytes | None:
    values = request.args.get(name)
    return values[-1] if values else None


def _revision(text: bytes | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise APIError(400, f"{name} must be a revision: an integer >= 0")
    return value


def _sse_json(kind: bytes, document: object, revision: int | None = None) -> bytes:
    head = b"" if revision is None else b"id: %d\n" % revision
    return head + b"event: " + kind + b"\ndata: " + render_json(document) + b"\n\n"


class Watchers:
    """Every open stream and blocking read of one node, and their counters."""

    log = Logger()

    def __init__(
        self,
        feed: ChangeFeed,
        cache: Cache,
        clock: Any,
        buffer_bytes: int = 1024 * 1024,
        heartbeat: float = 15.0,
        max_open: int = 10_000,
        max_key_bytes: int = 1024,
    ):
        self.feed = feed
        self.cache = cache
        self.clock = clock
        self.buffer_bytes = buffer_bytes
        self.heartbeat = heartbeat
        self.max_open = max_open
        self.max_key_bytes = max_key_bytes
        self.streams: set[Stream] = set()
        self.polls: set[LongPoll] = set()
        self.events_sent = 0
        self.dropped_slow = 0
        self.closing = False
        self._heartbeat: LoopingCall | None = None
        self._dirty: list[Stream] = []  # streams with events to send this turn
        self._flushing: Any = None
        feed.on_reset.append(self._reset_all)

    wants = staticmethod(wants_stream)

    @property
    def open(self) -> int:
        return len(self.streams) + len(self.polls)

    def _refuse_if_full(self) -> None:
        if self.closing:
            raise APIError(503, "dache is shutting down; watch another node")
        if self.open >= self.max_open:
            raise APIError(503, f"this node has {self.max_open} watchers open (WATCH_MAX)")

    # -- GET /dache?watch=true

    def stream(self, request: IRequest) -> Deferred[bytes] | bytes:
        prefix_raw = _arg(request, b"prefix") or b""
        try:
            prefix = prefix_raw.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "prefix is not valid UTF-8")
        if len(prefix_raw) > self.max_key_bytes:
            raise APIError(400, f"prefix is over the {self.max_key_bytes}-byte key limit")
        since = _revision(_arg(request, b"since"), "since")
        if since is None:
            since = _revision(request.getHeader(b"last-event-id"), "Last-Event-ID")
        self._refuse_if_full()
        stream = Stream(self, request, prefix)
        self.streams.add(stream)
        self._start_heartbeat()
        stream.start(since)
        return stream.ended

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = LoopingCall(self._beat)
            self._heartbeat.clock = self.clock
            self._heartbeat.start(self.heartbeat, now=False)

    def _beat(self) -> None:
        for stream in list(self.streams):
            stream.send(b": heartbeat\n\n")
        if not self.streams and self._heartbeat is not None:
            self._heartbeat.stop()  # no CPU at all with nobody watching
            self._heartbeat = None

    def flush_later(self, stream: Stream) -> None:
        self._dirty.append(stream)
        if self._flushing is None:
            self._flushing = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushing = None
        dirty, self._dirty = self._dirty, []
        for stream in dirty:
            stream.flush()

    def _reset_all(self, revision: int) -> None:
        for stream in list(self.streams):
            stream.flush()
            stream.send(_sse_json(b"reset", {"revision": revision}, revision))

    # -- GET /dache/<key>?wait=

    def long_poll(self, request: IRequest, key: str) -> int | bytes:
        wait_raw = _arg(request, b"wait")
        try:
            wait = float(wait_raw) if wait_raw is not None else math.nan
        except ValueError:
            wait = math.nan
        if not (0 <= wait <= MAX_WAIT):
            raise APIError(400, f"wait must be a number of seconds from 0 to {MAX_WAIT:g}")
        known = _revision(_arg(request, b"revision"), "revision")
        entry = self.cache.get(key, self.clock.seconds())
        current = None if entry is None else revision_of(entry)
        if known is None:  # no revision: wait for the next change
            known = current or 0
        if (current is not None and current > known) or (current is None and known > 0):
            return answer_entry(self.cache, self.clock, request, key)  # changed already
        if wait == 0:
            return answer_entry(self.cache, self.clock, request, key)
        self._refuse_if_full()
        poll = LongPoll(self, request, key, wait)
        self.polls.add(poll)
        return NOT_DONE_YET

    # -- shutdown

    def close(self) -> None:
        """SIGTERM: end every stream cleanly and answer every blocking read now."""
        self.closing = True
        for stream in list(self.streams):
            stream.end(b": dache is shutting down\n\n")
        for poll in list(self.polls):
            poll.answer()
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None


def answer_entry(cache: Cache, clock: Any, request: IRequest, key: str) -> bytes:
    """A GET's answer, as api.get gives it: the entry with its ETag, or 404."""
    entry = cache.get(key, clock.seconds())
    request.setHeader(b"content-type", JSON)
    if entry is None:
        request.setResponseCode(404)
        return error_body("key not found")
    request.setHeader(b"etag", etag_of(entry))
    return body_of(entry)


@implementer(IPushProducer)
class Stream:
    """One open text/event-stream response."""

    def __init__(self, watchers: Watchers, request: IRequest, prefix: str):
        self.watchers = watchers
        self.request = request
        self.prefix = prefix
        self.paused = False
        self.backlog: list[bytes] = []  # held while the transport is paused
        self.backlog_bytes = 0
        self.pending: list[bytes] = []  # this reactor turn's events, not written yet
        self.done = False
        self.held: list[Event] | None = None  # live events held during an engine replay
        self.replayed_through = 0  # the engine's replay covered changes up to here
        self.token: int | None = None
        self.ended: Deferred[bytes] = Deferred(lambda _: self._gone())

    def start(self, since: int | None) -> None:
        request, feed = self.request, self.watchers.feed
        request.setHeader(b"content-type", EVENT_STREAM + b"; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")  # nginx: don't buffer the stream
        # The watcher is its own streaming producer with its own bound (WATCH_BUFFER),
        # so it does not use DacheRequest.begin_stream(); the channel's timeouts and
        # SEND_TIMEOUT apply between requests only, never to an answer in progress.
        request.registerProducer(self, True)
        # Replay and subscription in one turn: nothing can be released between.
        head = [b": watching %b at revision %d\n\n" % (render_json(self.prefix), feed.revision)]
        self.token = feed.subscribe(self.prefix, self.deliver)
        if since is not None:
            replay = feed.replay(since, self.prefix)
            if replay is None and feed.older is not None:
                self.send(b"".join(head))
                self._replay_from_engine(since)
                return
            if replay is None:
                head.append(_sse_json(b"reset", {"revision": feed.revision}, feed.revision))
            else:
                head.extend(event.sse() for event in replay)
                self.watchers.events_sent += len(replay)
        self.send(b"".join(head))

    def _replay_from_engine(self, since: int) -> None:
        """
        Older than the history: the engine's own record (PostgreSQL: the
        table's rows and tombstones above `since`). Live events arriving
        meanwhile are held, then sent after the replay, less what it covered.
        """
        self.held = []
        feed = self.watchers.feed

        def replayed(result: tuple[int, list[Event]] | None) -> None:
            held, self.held = self.held or [], None
            if self.done:
                return
            if result is None:  # too old for the engine too, or it failed
                self.send(_sse_json(b"reset", {"revision": feed.revision}, feed.revision))
                events, last = [], feed.revision
            else:
                last, events = result
                events = [e for e in events if e.key.startswith(self.prefix)]
            self.replayed_through = last
            events += [e for e in held if e.kind == EVENT_EXPIRE or e.revision > last]
            self.watchers.events_sent += len(events)
            if events:
                self.send(b"".join(e.sse() for e in events))

        feed.older(since).addCallbacks(replayed, lambda _: replayed(None))

    def deliver(self, event: Event) -> None:
        held = self.held
        if held is not None:  # a replay from the engine is under way
            held.append(event)
            if len(held) > self.watchers.feed.history_count:
                self._drop()
            return
        if event.revision <= self.replayed_through and event.kind != EVENT_EXPIRE:
            return  # the engine's replay already had it
        # Events are sent once per reactor turn, all of the turn's in one write:
        # a committer batch of 16 changes is one write per watcher, not 16.
        self.watchers.events_sent += 1
        # (A turn's events are bounded by the committer's batch; WATCH_BUFFER bounds
        # what is held beyond that, while the transport is paused.)
        self.pending.append(event.sse())
        if len(self.pending) == 1:
            self.watchers.flush_later(self)

    def flush(self) -> None:
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            self.send(data)

    def send(self, data: bytes) -> None:
        if self.done:
            return
        if not self.paused:
            self.request.write(data)
            return
        self.backlog.append(data)
        self.backlog_bytes += len(data)
        if self.backlog_bytes > self.watchers.buffer_bytes:
            self._drop()

    def _drop(self) -> None:
        self.watchers.dropped_slow += 1
        self.backlog, self.backlog_bytes = [], 0
        self.pending = []
        limit = self.watchers.buffer_bytes
        message = f"this watcher fell {limit} bytes behind (WATCH_BUFFER); resume from the last id"
        self.request.write(_sse_json(b"error", {"error": message}))
        transport = getattr(self.request.channel, "transport", None)
        self.end(b"")
        if transport is not None:  # a client that does not read never takes the close
            self.watchers.clock.callLater(ABORT_AFTER, transport.abortConnection)

    def end(self, last: bytes) -> None:
        """End the response cleanly (the terminating chunk), after `last`."""
        if self.done:
            return
        self.flush()
        if last and not self.paused:
            self.request.write(last)
        self._gone()
        self.ended.callback(b"")

    def _gone(self) -> None:
        if self.done:
            return
        self.done = True
        self.watchers.streams.discard(self)
        if self.token is not None:
            self.watchers.feed.unsubscribe(self.prefix, self.token)
        try:
            self.request.unregisterProducer()
        except Exception:  # already unregistered by a lost connection
            pass

    # IPushProducer, called by the transport

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.backlog and not self.done:
            data, self.backlog, self.backlog_bytes = b"".join(self.backlog), [], 0
            self.request.write(data)

    def stopProducing(self) -> None:
        self._gone()


class LongPoll:
    """One blocking read: answered at the key's next change, or after `wait`."""

    def __init__(self, watchers: Watchers, request: IRequest, key: str, wait: float):
        self.watchers = watchers
        self.request = request
        self.key = key
        self.done = False
        self.token = watchers.feed.wait_for_key(key, self.answer)
        self.timer = watchers.clock.callLater(wait, self.answer)
        request.notifyFinish().addBoth(lambda _: self._forget())

    def answer(self) -> None:
        if self.done:
            return
        self._forget()
        body = answer_entry(self.watchers.cache, self.watchers.clock, self.request, self.key)
        if getattr(self.request, "_disconnected", False):
            return
        self.request.setHeader(b"content-length", b"%d" % len(body))
        if self.request.method != b"HEAD":
            self.request.write(body)
        self.request.finish()

    def _forget(self) -> None:
        if self.done:
            return
        self.done = True
        self.watchers.polls.discard(self)
        self.watchers.feed.stop_waiting(self.key, self.token)
        if self.timer.active():
            self.timer.cancel()


def attach(
    api: Any,
    committer: Any,
    cache: Cache,
    clock: Any,
    config: Any = None,
    followed: Any = None,
    revision: int = 0,
) -> Watchers:
    """
    Give a node its change feed and watchers: hook the feed to the committer
    (own writes), the followed cache (other nodes') and the expiry sweep, and
    hand the watchers to the API.
    """
    options = (
        {}
        if config is None
        else {
            "buffer_bytes": config.watch_buffer,
            "heartbeat": config.watch_heartbeat,
            "max_open": config.watch_max,
            "max_key_bytes": config.max_key_bytes,
        }
    )
    feed = ChangeFeed(
        history_count=10_000 if config is None else config.watch_history,
        history_bytes=16 * 1024 * 1024 if config is None else config.watch_history_bytes,
        revision=revision,
        ordered=followed is not None,
    )
    committer.on_applied.append(feed.offer)
    changes_since = getattr(committer.engine, "changes_since", None)
    if changes_since is not None:  # replay older than the history from the engine

        def older(since: int) -> Deferred[Any]:
            d = changes_since(since, feed.history_count)
            return d.addCallback(
                lambda r: None if r is None else (r[0], [Event.from_change(c) for c in r[1]])
            )

        feed.older = older
    cache.on_expire = publish_expiries(feed)
    if followed is not None:
        followed.feed = feed
        feed.settle(revision)
    watchers = Watchers(feed, cache, clock, **options)
    api.watch = watchers
    return watchers
