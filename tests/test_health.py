"""The rail health state machine on its own: transitions, back-off, forgiveness."""

from __future__ import annotations

from tent_async.core import Health, RailHealth, SchedulerConfig


def make(**kw: object) -> RailHealth:
    cfg = SchedulerConfig(
        quarantine_after=3, failure_window=1.0, backoff_base=0.1, backoff_cap=0.8, backoff_decay=2.0, **kw
    )
    return RailHealth(cfg)


def test_one_failure_makes_a_rail_suspect_and_successes_heal_it() -> None:
    h = make(recover_after=2)
    assert h.state is Health.HEALTHY and h.window(2) == 2
    assert h.on_failure(0.0) is Health.SUSPECT
    assert h.usable and h.window(2) == 1
    assert h.on_success(0.1) is Health.SUSPECT
    assert h.on_success(0.2) is Health.HEALTHY


def test_k_failures_in_the_window_quarantine() -> None:
    h = make()
    h.on_failure(0.0)
    h.on_failure(0.5)
    assert h.on_failure(0.9) is Health.QUARANTINED
    assert not h.usable
    assert h.quarantine_until == 0.9 + 0.1


def test_failures_outside_the_window_with_successes_between_do_not_add_up() -> None:
    h = make()
    h.on_failure(0.0)
    h.on_success(0.2)
    h.on_failure(0.5)
    h.on_success(0.7)
    assert h.on_failure(1.6) is Health.SUSPECT  # the first two aged out, and it worked between


def test_failures_in_a_row_quarantine_however_far_apart() -> None:
    # e.g. a stalled rail whose withdrawals take long to confirm: one miss every 0.6 s
    h = make()
    h.on_failure(0.0)
    h.on_failure(0.6)
    assert h.on_failure(1.2) is Health.QUARANTINED


def test_rail_down_quarantines_at_once() -> None:
    h = make()
    assert h.on_failure(0.0, rail_down=True) is Health.QUARANTINED


def test_quarantine_expires_into_probing_and_a_probe_decides() -> None:
    h = make()
    h.on_failure(0.0, rail_down=True)
    assert h.tick(0.05) is Health.QUARANTINED
    assert h.tick(0.1) is Health.PROBING
    assert h.usable and h.window(2) == 1
    assert h.on_success(0.11) is Health.HEALTHY
    h2 = make()
    h2.on_failure(0.0, rail_down=True)
    h2.tick(0.1)
    assert h2.on_failure(0.12) is Health.QUARANTINED  # a failed probe goes straight back
    assert h2.quarantine_until == 0.12 + 0.2  # with a doubled back-off


def test_backoff_doubles_up_to_the_cap() -> None:
    h = make()
    now = 0.0
    lengths = []
    for _ in range(6):
        h.on_failure(now, rail_down=True)
        lengths.append(round(h.quarantine_until - now, 6))
        now = h.quarantine_until
        h.tick(now)
    assert lengths == [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]


def test_a_flapping_rail_keeps_its_backoff_after_a_single_success() -> None:
    h = make()
    h.on_failure(0.0, rail_down=True)  # 100 ms
    h.tick(0.1)
    h.on_success(0.1)  # probe ok: healthy again
    h.on_failure(0.2, rail_down=True)  # flaps at once
    assert h.quarantine_until - 0.2 == 0.2  # not reset to 100 ms


def test_clean_service_forgives_the_backoff_step_by_step() -> None:
    h = make()
    h.on_failure(0.0, rail_down=True)
    h.tick(0.1)
    h.on_failure(0.1)  # failed probe: level 2
    h.tick(0.31)
    h.on_success(0.31)
    assert h.level == 2
    h.on_failure(4.4, rail_down=True)  # 4.09 s clean = two decay periods
    assert abs(h.quarantine_until - 4.4 - 0.1) < 1e-9
