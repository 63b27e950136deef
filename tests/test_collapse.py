"""Collapse monitor: length drop and majority-takeover warnings."""

from grouprl.monitor.collapse import CollapseMonitor


def test_length_drop_warns_past_30_percent():
    m = CollapseMonitor()
    assert m.check({"completions/mean_length": 100.0}) == []
    assert m.check({"completions/mean_length": 71.0}) == []  # 29% shorter: fine
    (msg,) = m.check({"completions/mean_length": 69.0})  # 31% shorter
    assert "31% below its start (100.0)" in msg


def test_majority_takeover_needs_low_entropy():
    m = CollapseMonitor(entropy_floor=0.5)
    base = {"completions/mean_length": 10.0}
    assert m.check({**base, "ttrl/majority_ratio": 0.97, "entropy": 0.8}) == []
    assert m.check({**base, "ttrl/majority_ratio": 0.9, "entropy": 0.1}) == []
    (msg,) = m.check({**base, "ttrl/majority_ratio": 0.97, "entropy": 0.1})
    assert "majority ratio 0.97" in msg
    # the entropy band's lower bound, when logged, is the floor
    assert (
        m.check({**base, "ttrl/majority_ratio": 0.97, "entropy": 0.1, "entropy_band/low": 0.05})
        == []
    )


def test_state_round_trip():
    m = CollapseMonitor()
    m.check({"completions/mean_length": 50.0})
    n = CollapseMonitor()
    n.load_state_dict(m.state_dict())
    assert n.check({"completions/mean_length": 30.0})
