from twisted.internet.task import Clock

from dache.engines import Change, EngineUnavailable
from dache.store.cache import Cache, revision_of, value_of
from dache.store.committer import Committer, ShuttingDown, WriteTimeout
from tests.engines import HeldEngine


def make(write_timeout=2.0):
    clock, cache, engine = Clock(), Cache(), HeldEngine()
    return clock, cache, engine, Committer(engine, cache, clock, write_timeout)


def results(d):
    out = []
    d.addBoth(out.append)
    return out


def test_changes_queued_behind_a_write_go_as_one_batch_in_order():
    clock, cache, engine, committer = make()
    first = results(committer.submit(Change.set("k", b"1")))
    later = [results(committer.submit(Change.set("k", str(i).encode()))) for i in range(2, 7)]
    later.append(results(committer.submit(Change.delete("k"))))
    later.append(results(committer.submit(Change.set("k", b"7"))))
    assert len(engine.writes) == 1  # only the first went; the rest wait
    assert first == [] and cache.get("k", 0) is None  # not visible before durable

    engine.release()
    assert first == [1]
    assert value_of(cache.get("k", 0)) == 1
    assert len(engine.writes) == 1
    batch = engine.writes[0][0]
    assert [c.kind for c in batch] == ["set"] * 5 + ["delete", "set"]
    assert [c.revision for c in batch] == list(range(2, 9))

    engine.release()
    assert [r[0] for r in later] == list(range(2, 9))  # acknowledged in submission order
    assert value_of(cache.get("k", 0)) == 7  # memory matches the last acknowledged change
    assert committer.batches == 2 and committer.changes == 8


def test_a_failed_batch_is_refused_and_changes_nothing():
    clock, cache, engine, committer = make()
    committer.submit(Change.set("k", b"1"))
    engine.release()
    answers = [results(committer.submit(Change.set("k", b"2")))]
    answers += [results(committer.submit(Change.delete("k")))]
    engine.refuse("connection refused")
    engine.refuse("connection refused")
    for answer in answers:
        assert answer[0].check(EngineUnavailable)
        assert str(answer[0].value) == "connection refused"
    assert value_of(cache.get("k", 0)) == 1
    assert committer.last_error == "connection refused"

    ok = results(committer.submit(Change.set("k", b"3")))  # the engine is tried again
    engine.release()
    assert ok == [4] and value_of(cache.get("k", 0)) == 3
    assert committer.last_error is None


def test_timeout_answers_503_and_a_late_confirmation_is_still_applied():
    clock, cache, engine, committer = make(write_timeout=2.0)
    in_flight = results(committer.submit(Change.set("k", b"1")))
    queued = results(committer.submit(Change.set("k", b"2")))
    clock.advance(2.0)
    assert in_flight[0].check(WriteTimeout) and queued[0].check(WriteTimeout)
    assert "2s" in str(in_flight[0].value)
    # The engine confirms the first write after all: memory must mirror it.
    engine.release()
    assert value_of(cache.get("k", 0)) == 1
    # The queued change never reached the engine and never will.
    assert engine.writes == []
    assert not committer.busy


def test_an_unexpected_engine_error_is_a_generic_503():
    class Broken(HeldEngine):
        def write(self, changes):
            raise RuntimeError("secret detail")

    clock, cache = Clock(), Cache()
    committer = Committer(Broken(), cache, clock)
    answer = results(committer.submit(Change.set("k", b"1")))
    assert answer[0].check(EngineUnavailable)
    assert "secret" not in str(answer[0].value)
    assert len(cache) == 0


def test_a_cancelled_request_does_not_cancel_its_write():
    clock, cache, engine, committer = make()
    d = committer.submit(Change.set("k", b"1"))
    d.addErrback(lambda f: None)
    d.cancel()  # the client went away
    engine.release()
    assert value_of(cache.get("k", 0)) == 1


def test_drain_waits_for_in_flight_writes_then_refuses_new_ones():
    clock, cache, engine, committer = make()
    acked = results(committer.submit(Change.set("k", b"1")))
    drained = results(committer.drain())
    refused = results(committer.submit(Change.set("k", b"2")))
    assert refused[0].check(ShuttingDown)
    assert drained == []
    engine.release()
    assert acked == [1] and drained == [None]


def test_revisions_continue_from_the_loaded_state():
    clock, cache, engine = Clock(), Cache(), HeldEngine()
    committer = Committer(engine, cache, clock, revision=41)
    answer = results(committer.submit(Change.set("k", b"1")))
    engine.release()
    assert answer == [42] and revision_of(cache.get("k", 0)) == 42
