"""The queue deadline: a number of batches times the batch time the replica measures, never below its floor."""

from __future__ import annotations

import pytest

from deployments.queue_deadline import QueueDeadline


def _measured(batch_s: float, batches: int = 50, count: int = 100, min_wait_s: float = 0.5) -> QueueDeadline:
    deadline = QueueDeadline(batches=batches, min_wait_s=min_wait_s, retry_after_s=3)
    for _ in range(count):
        deadline.observe(batch_s)
    return deadline


def test_nothing_is_refused_before_the_first_batch_is_timed() -> None:
    deadline = QueueDeadline(batches=4, min_wait_s=0.5)
    assert deadline.max_wait_s is None
    assert deadline.refusal(received_at=0.0, now=1e6) is None


def test_a_request_waiting_longer_than_the_measured_batches_is_refused_with_retry_after() -> None:
    deadline = _measured(0.1)
    assert deadline.max_wait_s == pytest.approx(5.0)
    assert deadline.refusal(received_at=100.0, now=104.9) is None
    late = deadline.refusal(received_at=100.0, now=105.1)
    assert late is not None and (late.status_code, late.code, late.headers) == (
        503,
        "overloaded",
        {"Retry-After": "3"},
    )


def test_a_machine_twice_as_slow_serves_the_same_load_it_waits_twice_as_long_for() -> None:
    # The same queue (30 batches ahead) on two machines: each serves it.
    fast, slow = _measured(0.1), _measured(0.2)
    wait_fast, wait_slow = 30 * 0.1, 30 * 0.2
    assert fast.refusal(0.0, wait_fast) is None and slow.refusal(0.0, wait_slow) is None
    assert slow.max_wait_s == pytest.approx(2 * fast.max_wait_s)  # type: ignore[operator]
    # The fast machine's deadline as a constant (5 s) would refuse the slow machine's 6 s wait.
    assert fast.refusal(0.0, wait_slow) is not None


def test_the_measure_follows_a_change_of_pace_within_tens_of_batches() -> None:
    deadline = _measured(0.1)
    for _ in range(30):
        deadline.observe(0.3)
    assert 0.28 < deadline.batch_s < 0.3  # type: ignore[operator]
    deadline.observe(3.0)  # one odd batch moves it by a tenth of the difference
    assert deadline.batch_s == pytest.approx(0.3 + 0.27, abs=0.02)


def test_quick_batches_never_bring_the_deadline_below_its_floor() -> None:
    deadline = _measured(0.001, min_wait_s=2.0)
    assert deadline.max_wait_s == 2.0
    assert deadline.refusal(0.0, 1.9) is None and deadline.refusal(0.0, 2.1) is not None


def test_without_batches_there_is_no_deadline_whatever_is_measured() -> None:
    deadline = QueueDeadline(batches=None, min_wait_s=1.0)
    deadline.observe(0.5)
    assert deadline.max_wait_s is None and deadline.batch_s is None
    assert deadline.refusal(0.0, 1e9) is None


def test_an_overloads_slow_batches_do_not_stretch_the_deadline_a_rated_load_taught() -> None:
    deadline = _measured(0.1, batches=12)  # learnt with shallow queues
    for _ in range(50):
        deadline.observe(1.0, queued_batches=16)  # 16 batches waiting: more than half the deadline's 12
    assert deadline.batch_s == pytest.approx(0.1)
    for _ in range(50):
        deadline.observe(0.2, queued_batches=6)  # a slower machine at its rated load: learnt
    assert deadline.batch_s == pytest.approx(0.2, rel=0.01)


def test_the_first_batch_is_learnt_whatever_the_queue() -> None:
    deadline = QueueDeadline(batches=12, min_wait_s=0.5)
    deadline.observe(1.0, queued_batches=100)
    assert deadline.max_wait_s == pytest.approx(12.0)


def test_a_request_that_would_wait_past_the_deadline_behind_the_work_ahead_is_refused_on_arrival() -> None:
    deadline = _measured(0.1, batches=12)  # 1.2 s
    assert deadline.refusal(received_at=0.0, now=0.2, batches_ahead=9) is None  # 0.2 + 0.9 s
    assert deadline.refusal(received_at=0.0, now=0.2, batches_ahead=11) is not None  # 0.2 + 1.1 s
