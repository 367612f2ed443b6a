"""The time policies (nodecache.backoff, nodecache.expiring) on a clock the test moves."""

import itertools

from nodecache.backoff import delays, proof_backoff
from nodecache.expiring import ExpiringSet, Window


def test_a_window_is_open_for_its_seconds_then_closes_by_itself():
    now = [100.0]
    w = Window(10.0, clock=lambda: now[0])
    assert not w  # never opened: closed (a source that never listed itself may list itself now)
    w.open()
    now[0] = 109.9
    assert w
    now[0] = 110.0
    assert not w
    w.open()
    w.close()  # upstream answered again: closed at once
    assert not w


def test_a_member_can_be_forgiven_before_it_expires():
    now = [0.0]
    s = ExpiringSet(ttl=5, max_items=10, clock=lambda: now[0])
    s.add("peer-a")
    s.add("peer-b")
    s.discard("peer-a")
    s.discard("never-added")
    assert "peer-a" not in s and "peer-b" in s
    now[0] = 5.0
    assert "peer-b" not in s


def test_proof_backoff_grows_four_fold_and_is_capped():
    assert [proof_backoff(n, 1.0) for n in (0, 1, 2, 3)] == [1.0, 1.0, 4.0, 16.0]
    assert proof_backoff(10, 1.0, cap=60.0) == 60.0


def test_fill_retry_delays_cap_the_first_one_too():
    """The fill retry uses delays(retry_base, 5 s): no wait is longer than the cap, the first included."""
    assert list(itertools.islice(delays(8.0, 5.0, jitter=lambda lo, hi: 1.0), 3)) == [5.0, 5.0, 5.0]
