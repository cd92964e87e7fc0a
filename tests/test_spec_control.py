"""The speculation controller (engine.spec_control) on synthetic step costs: it speculates where the measured
numbers predict a gain, stops where they predict a loss, and measures what it does not know at a bounded cost."""

from __future__ import annotations

import pytest

from engine.spec_control import PROBE_SEQUENCES, SMALL_BATCH, CostTable, SpeculationControl


def memory_bound(rows: int) -> float:
    """A small model on a CPU: a step costs about the same up to a few rows, then grows with them."""
    return 0.025 + 0.002 * rows


def compute_bound(rows: int) -> float:
    return 0.004 * rows


def teach(control: SpeculationControl, target, draft, acceptance: float, rows: list[int]) -> None:  # type: ignore[no-untyped-def]
    for r in rows:
        control.observe_target(r, target(r))
        control.observe_draft(r, draft(r))
    control.observe_acceptance(100, round(100 * acceptance))


def test_a_cost_table_interpolates_and_extrapolates_pessimistically() -> None:
    table = CostTable()
    assert table.estimate(4) is None
    table.observe(1, 0.01)
    table.observe(16, 0.05)
    assert table.estimate(1) == 0.01 and table.estimate(16) == 0.05
    assert 0.01 < table.estimate(4) < 0.05  # type: ignore[operator]
    assert table.estimate(64) == pytest.approx(0.05 * 4)  # beyond the largest: proportional to rows
    table.observe(16, 0.15)
    assert table.estimate(16) == pytest.approx(0.8 * 0.05 + 0.2 * 0.15)  # a moving average


def test_it_measures_then_speculates_where_drafts_pay() -> None:
    control = SpeculationControl(max_k=4, adaptive=True)
    assert control.decide(1, 1).k == 0 and control.last.exploring  # the plain step's cost first
    control.observe_target(1, memory_bound(1))
    assert control.decide(1, 1).k == 4 and control.last.exploring  # then a speculative step's
    teach(control, memory_bound, lambda r: 0.3 * memory_bound(r), 0.9, [1, 2, 3, 4, 5])
    decision = control.decide(1, 1)
    assert decision.k >= 2 and not decision.exploring and decision.predicted_gain > 1.3


def test_it_stops_where_verifying_costs_more_than_it_gains_and_probes_rarely() -> None:
    control = SpeculationControl(max_k=4, adaptive=True)
    teach(control, compute_bound, lambda r: 0.5 * compute_bound(r), 0.5, [1, 2, 4, 8, 16, 32, 64])
    decisions = [control.decide(64, 64) for _ in range(64 + 1 + 128 + 1)]
    probes = [i for i, d in enumerate(decisions) if d.k > 0]
    assert probes == [64, 64 + 1 + 128]  # after 64 steps off, then 128 more (doubling)
    assert all(decisions[i].max_sequences == PROBE_SEQUENCES and decisions[i].exploring for i in probes)
    assert all(d.predicted_gain == 1.0 for d in decisions)


def test_a_small_batch_explores_unknown_costs_at_once_a_large_one_does_not() -> None:
    control = SpeculationControl(max_k=4, adaptive=True)
    teach(control, memory_bound, lambda r: 0.3 * memory_bound(r), 0.8, [1, 2, 5])
    control.observe_target(SMALL_BATCH, memory_bound(SMALL_BATCH))
    assert control.decide(SMALL_BATCH, SMALL_BATCH).exploring  # its verify (40 rows) is unknown: measured
    control.observe_target(60, compute_bound(60))
    big = control.decide(60, 60)
    assert not big.exploring and big.k == 0  # unknown costs estimated pessimistically: off


def test_fixed_mode_and_nothing_to_draft() -> None:
    fixed = SpeculationControl(max_k=3, adaptive=False)
    assert fixed.decide(64, 64).k == 3
    assert SpeculationControl(max_k=3, adaptive=True).decide(5, 0).k == 0


def test_measured_speculative_steps_correct_the_model() -> None:
    """Costs the forwards leave out (catch-up rows, drawing drafts) show in whole steps: once measured, a
    speculation the forwards alone favour is turned off."""
    control = SpeculationControl(max_k=4, adaptive=True)
    teach(control, memory_bound, lambda r: 0.4 * memory_bound(r), 0.9, [1, 2, 4, 8, 16, 32, 40])
    assert control.decide(8, 8).k > 0
    for _ in range(10):
        control.observe_step(8, 8, 4, 3 * (4 * 0.4 * memory_bound(8) + memory_bound(40)))
    assert control.decide(8, 8).k == 0


def test_drafts_fit_the_step_token_budget() -> None:
    control = SpeculationControl(max_k=4, adaptive=False)
    control.decide(200, 200, token_budget=256)
    assert control.drafting(200, 200, 4) == 14 and control.drafting(200, 200, 1) == 56
    assert control.drafting(300, 300, 1) == 0
