"""
Watching changes over HTTP: a Server-Sent Events stream and blocking reads.

    GET /dache?watch=true&prefix=<p>&since=<revision>   (or Accept: text/event-stream)
    GET /dache/<key>?wait=<seconds>&revision=<n>

A stream first replays every kept change after `since` (or the Last-Event-ID
header an EventSource sends when it reconnects), then goes on live; the
replay and the subscription happen in one reactor turn, so there is no gap
and no duplicate. A `since` older than the kept history gets `event: reset`
(with the current revision as its id) first: the client re-lists and goes on.

Live events go out through dache.web.fanout: encoded once per event,
written once per stream per reactor turn, never on a write's answer path.

A watcher that does not read: Twisted's transport pauses its producer (this
stream) once its own buffer is full; events then queue here, up to
WATCH_BUFFER bytes, and past that the watcher gets `event: error` and is
disconnected. Nothing runs for an idle stream but one shared heartbeat timer.

Streams and blocking reads are bounded by WATCH_MAX, not MAX_CONNECTIONS: a
connection that becomes one moves from the site's connection count to the
watchers' (DacheSite.watch_began / watch_ended), so watchers never starve
ordinary requests of connections.
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
from dache.web.fanout import Fanouts, chunk

EVENT_STREAM = b"text/event-stream"
MAX_WAIT = 300.0  # seconds a blocking read may wait
ABORT_AFTER = 5.0  # seconds a dropped watcher gets to take its last event
HEARTBEAT = b": heartbeat\n\n"
HEARTBEAT_CHUNK = chunk(HEARTBEAT)


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
        self.fanouts = Fanouts(feed, clock)
        self.replayed = 0  # events sent from a replay (the fan-out counts live ones)
        self.dropped_slow = 0
        self.closing = False
        self._heartbeat: LoopingCall | None = None
        feed.on_reset.append(self._reset_all)

    wants = staticmethod(wants_stream)

    @property
    def open(self) -> int:
        return len(self.streams) + len(self.polls)

    @property
    def events_sent(self) -> int:
        """Events sent to streams, one per event per watcher."""
        return self.replayed + self.fanouts.events_sent

    def _refuse_if_full(self) -> None:
        if self.closing:
            raise APIError(503, "dache is shutting down; watch another node")
        if self.open >= self.max_open:
            raise APIError(
                503,
                f"this node has its limit of {self.max_open} watch streams and blocking "
                "reads open (WATCH_MAX); retry later or watch another node",
            )

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
            if stream.plain:
                stream.channel.write_through(HEARTBEAT_CHUNK)  # one bytes object for all
            else:
                stream.send(HEARTBEAT)
        if not self.streams and self._heartbeat is not None:
            self._heartbeat.stop()  # no CPU at all with nobody watching
            self._heartbeat = None

    def _reset_all(self, revision: int) -> None:
        self.fanouts.flush()  # what was released before the reset goes first
        for stream in list(self.streams):
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
        self.fanouts.flush()  # every released event, before the end
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


def _count_as_watcher(request: IRequest) -> Any:
    """
    Move the request's connection from the site's MAX_CONNECTIONS count to the
    watchers' (WATCH_MAX); the site to hand it back to, or None (no such site).
    """
    site = getattr(getattr(request, "channel", None), "site", None)
    if getattr(site, "watch_began", None) is None:
        return None
    site.watch_began()
    return site


@implementer(IPushProducer)
class Stream:
    """One open text/event-stream response."""

    def __init__(self, watchers: Watchers, request: IRequest, prefix: str):
        self.watchers = watchers
        self.request = request
        self.channel = request.channel
        self.prefix = prefix
        # plain: the fan-out may write the turn's shared chunk straight to the
        # channel; False while anything below needs the events one by one.
        self.plain = False
        self.paused = False
        self.backlog: list[bytes] = []  # held while the transport is paused
        self.backlog_bytes = 0
        self.skip = 0  # events queued this turn before the stream began (see Fanouts.join)
        self.done = False
        self.held: list[Event] | None = None  # live events held during an engine replay
        self.replayed_through = 0  # the engine's replay covered changes up to here
        self.site: Any = None  # the site this connection's count was moved from
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
        self.site = _count_as_watcher(request)
        # Replay and subscription in one turn: nothing can be released between.
        head = [b": watching %b at revision %d\n\n" % (render_json(self.prefix), feed.revision)]
        self.watchers.fanouts.join(self)
        if since is not None:
            replay = feed.replay(since, self.prefix)
            if replay is None and feed.older is not None:
                self.send(b"".join(head))
                self._replay_from_engine(since)
                self._update()
                return
            if replay is None:
                head.append(_sse_json(b"reset", {"revision": feed.revision}, feed.revision))
            else:
                head.extend(event.sse() for event in replay)
                self.watchers.replayed += len(replay)
        self.send(b"".join(head))  # the headers go with it: request.chunked is known now
        self._update()

    def _update(self) -> None:
        request = self.request
        self.plain = not (
            self.done
            or self.paused
            or self.skip
            or self.held is not None
            or self.replayed_through
            or not request.chunked  # an HTTP/1.0 client: no chunk framing
            or request.method == b"HEAD"
        )

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
            # Live events up to `last` (queued this turn, or held in ordered mode) are
            # left out by take() until the feed has passed it.
            self.replayed_through = last
            events += [e for e in held if e.kind == EVENT_EXPIRE or e.revision > last]
            self.watchers.replayed += len(events)
            if events:
                self.send(b"".join(e.sse() for e in events))
            self._update()

        feed.older(since).addCallbacks(replayed, lambda _: replayed(None))

    def take(self, events: list[Event], data: bytes) -> int:
        """
        This turn's events when the shared chunk will not do (see `plain`);
        `data` is their SSE text. The number of events sent (or queued).
        """
        if self.done:
            return 0
        if self.skip:
            events, self.skip = events[self.skip :], 0
            data = b""
        held = self.held
        if held is not None:  # a replay from the engine is under way
            held.extend(events)
            if len(held) > self.watchers.feed.history_count:
                self._drop()
            return 0
        through = self.replayed_through
        if through:  # the engine's replay already had these
            events = [e for e in events if e.kind == EVENT_EXPIRE or e.revision > through]
            data = b""
            if self.watchers.feed.revision >= through:
                self.replayed_through = 0  # every later event is above it
        if events:
            self.send(data or b"".join([e.sse() for e in events]))
        self._update()
        return len(events)

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
        if last and not self.paused:
            self.request.write(last)
        self._gone()
        self.ended.callback(b"")

    def _gone(self) -> None:
        if self.done:
            return
        self.done = True
        self.plain = False
        self.watchers.streams.discard(self)
        self.watchers.fanouts.leave(self)
        if self.site is not None:
            self.site.watch_ended()  # an ordinary connection again, if it stays open
            self.site = None
        try:
            self.request.unregisterProducer()
        except Exception:  # already unregistered by a lost connection
            pass

    # IPushProducer, called by the transport

    def pauseProducing(self) -> None:
        self.paused = True
        self.plain = False

    def resumeProducing(self) -> None:
        self.paused = False
        if self.backlog and not self.done:
            data, self.backlog, self.backlog_bytes = b"".join(self.backlog), [], 0
            self.request.write(data)
        if not self.done:
            self._update()

    def stopProducing(self) -> None:
        self._gone()


class LongPoll:
    """One blocking read: answered at the key's next change, or after `wait`."""

    def __init__(self, watchers: Watchers, request: IRequest, key: str, wait: float):
        self.watchers = watchers
        self.request = request
        self.key = key
        self.done = False
        self.token = watchers.feed.wait_for_key(key, self._changed)
        self.timer = watchers.clock.callLater(wait, self.answer)
        self.site = _count_as_watcher(request)
        request.notifyFinish().addBoth(lambda _: self._forget())

    def _changed(self) -> None:
        # Answered in a later turn, as streams are: never on the write's own answer path.
        self.watchers.clock.callLater(0, self.answer)

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
        if self.site is not None:
            self.site.watch_ended()
            self.site = None


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
