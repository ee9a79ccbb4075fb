"""The change feed (dache/store/changes.py): order across nodes, duplicates, history bounds."""

from dache.engines import Change
from dache.store.changes import ChangeFeed


def set_change(key: str, revision: int) -> Change:
    return Change("set", key, b"1", None, revision)


def test_ordered_feed_holds_an_own_write_until_the_earlier_changes_of_other_nodes_are_in():
    feed = ChangeFeed(ordered=True)
    seen = []
    feed.subscribe("", lambda e: seen.append(e.revision))
    feed.offer(set_change("mine", 10))  # this node's write, before 9 was read from the table
    assert seen == []
    feed.offer(set_change("theirs", 9))
    feed.settle(10)  # the follower's watermark reached 10
    assert seen == [9, 10]
    feed.offer(set_change("mine", 10))  # the catch-up reading back the node's own write
    assert seen == [9, 10]
    assert [e.revision for e in feed.replay(0)] == [9, 10]


def test_history_is_bounded_by_count_and_bytes_and_replay_is_refused_below_it():
    feed = ChangeFeed(history_count=5, history_bytes=10_000)
    for revision in range(1, 11):
        feed.offer(set_change(f"k{revision}", revision))
    assert feed.history_size == 5 and feed.floor == 5
    assert feed.replay(4) is None
    assert [e.revision for e in feed.replay(5)] == [6, 7, 8, 9, 10]
    big = ChangeFeed(history_count=1000, history_bytes=1000)
    for revision in range(1, 50):
        big.offer(Change("set", "k", b'"' + b"x" * 100 + b'"', None, revision))
    assert big.history_held_bytes <= 1000 and big.history_size < 10


def test_a_prefix_subscription_costs_nothing_for_keys_it_does_not_match():
    feed = ChangeFeed()
    calls = []
    for i in range(100):
        feed.subscribe(f"group{i}/", lambda e, i=i: calls.append(i))
    feed.offer(set_change("group7/a", 1))
    feed.offer(set_change("other", 2))
    assert calls == [7]
