import pytest

from raylight.kvtransfer.handoff import Handoff, HandoffState, IllegalTransition


def test_happy_path_and_release_once():
    h = Handoff(1, object(), 10, 2, lease_s=5.0)
    for s in (HandoffState.READY, HandoffState.RUNNING, HandoffState.RELEASED):
        h.to(s)
    with pytest.raises(IllegalTransition):
        h.to(HandoffState.RELEASED)


def test_failure_goes_through_quarantine():
    h = Handoff(2, object(), 10, 2, lease_s=5.0)
    h.to(HandoffState.QUARANTINED, "prefill_failed")
    assert h.reason == "prefill_failed"
    with pytest.raises(IllegalTransition):  # a quarantined reservation never runs
        h.to(HandoffState.RUNNING)
    h.to(HandoffState.RELEASED)


def test_lease():
    h = Handoff(3, object(), 10, 2, lease_s=5.0)
    assert not h.expired(h.reserved_at + 4.9) and h.expired(h.reserved_at + 5.1)
    h.to(HandoffState.READY)
    assert not h.expired(h.reserved_at + 100)
