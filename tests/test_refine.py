"""The search's last trials and the confirmation's walk down the front, on recorded trials (no model).

Refinement: the gentlest feasible edit's weights are shrunk by 0.8, a failed shrink is retried halfway back to 1,
a feasible shrink is shrunk in turn, and a parent that cannot be shrunk any closer gives way to the next feasible
one. The confirmation: the lowest-KL front points first; the rest of the front only while none of them meets the
target held out; the paper's edit last and generated only when nothing with less reply KL met the target.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from abliterate.config import OptimizeConfig

WEIGHTS = ("mixer.peak_weight", "mlp.peak_weight", "embed_weight")


def _trial(number: int, kl: float, refusing: float, scale: float = 1.0, refines: int | None = None):
    params = {"position": -1, "direction_index": 1.5, "mixer.peak_weight": 1.2 * scale, "mixer.min_fraction": 0.5,
              "mlp.peak_weight": 0.9 * scale, "embed_weight": 0.4 * scale, "mixer.peak_layer": 2.0}
    attrs = {"refusing_share": refusing, **({} if refines is None else {"refines": refines, "scale": scale})}
    return SimpleNamespace(number=number, values=[0.1, kl], params=params, user_attrs=attrs)


def test_refinement_bisects_one_weight_scale_toward_the_refusal_boundary() -> None:
    from abliterate.search import refinement

    config = OptimizeConfig()
    assert refinement([_trial(0, math.inf, 0.5)], config) is None  # nothing feasible to shrink
    trials = [_trial(0, 0.004, 0.0), _trial(1, 0.002, 0.03), _trial(2, math.inf, 0.9)]
    step = refinement(trials, config)
    assert (step.parent, step.scale) == (1, 0.8)  # the gentlest feasible edit (refusing 0.03 <= 0.05)
    for name in WEIGHTS:
        assert step.values[name] == pytest.approx(trials[1].params[name] * 0.8)
    assert {k: v for k, v in step.values.items() if k not in WEIGHTS} == \
        {k: v for k, v in trials[1].params.items() if k not in WEIGHTS}  # one scale: nothing else moves
    scales = []
    while step.parent == 1:  # every shrink of trial 1 refuses too often: halfway back to 1 each time
        scales.append(step.scale)
        trials.append(_trial(len(trials), math.inf, 0.2, step.scale, refines=1))
        step = refinement(trials, config)
    assert scales == [0.8, 0.9, 0.95]  # 0.975 would change the KL too little to spend a trial on
    assert (step.parent, step.scale) == (0, 0.8)  # the next gentlest feasible edit


def test_a_feasible_shrink_is_shrunk_in_turn() -> None:
    from abliterate.search import refinement

    trials = [_trial(0, 0.004, 0.0), _trial(1, 0.0025, 0.0, 0.8, refines=0)]
    step = refinement(trials, OptimizeConfig())
    assert (step.parent, step.scale) == (1, 0.8)
    assert step.values["mlp.peak_weight"] == pytest.approx(0.9 * 0.64)


def test_a_parent_whose_feasible_shrink_did_not_lower_the_kl_is_not_shrunk_again() -> None:
    from abliterate.search import refinement

    trials = [_trial(0, 0.001, 0.0), _trial(1, 0.003, 0.0, 0.8, refines=0)]
    step = refinement(trials, OptimizeConfig())
    assert (step.parent, step.scale) == (1, 0.8)  # trial 0 stands for nothing more; its child is next


def test_a_shrink_above_max_weight_is_never_drawn() -> None:
    """The seeded paper's edit (weight 1) lies above a max_weight below 1: its shrinks would too, so the next
    feasible trial is shrunk instead, and every value drawn stays inside the search's ranges."""
    from abliterate.search import refinement

    paper = _trial(0, 0.001, 0.0, scale=1.0 / 1.2)  # mixer peak 1.0
    inside = _trial(1, 0.002, 0.0, scale=0.5)  # every weight at most 0.6
    config = OptimizeConfig(max_weight=0.6)
    assert refinement([paper], config) is None
    step = refinement([paper, inside], config)
    assert step.parent == 1 and all(step.values[name] <= 0.6 for name in WEIGHTS)


def test_the_last_share_of_the_trials_refines() -> None:
    from abliterate.search import refine_trials

    assert refine_trials(OptimizeConfig(n_trials=60)) == 9
    assert refine_trials(OptimizeConfig(n_trials=60, refine_share=0.0)) == 0


# ---- the confirmation's order ----

def _rows(table: dict[int, tuple[float, float]]):
    """A stand-in for confirm_in_order: (reply KL, refusal) per trial, generated in KL order until one meets 0.05,
    never at or above `bound`; records every call."""
    calls = []

    def confirm_in_order(model, tokenizer, edits, held, target, only=None, bound=math.inf):
        calls.append((list(edits), bound))
        rows, met = [], False
        for trial in sorted(edits, key=lambda t: table[t][0]):
            kl, refusal = table[trial]
            generate = not met and kl < bound
            rows.append({"trial": trial, "reply_kl": kl, "harmful_refusal": refusal if generate else None,
                         "harmful_refusal_thinking_on": None, "refusal_stopped_early": generate and refusal > target,
                         "identical_share": 1.0})
            met = met or (generate and refusal <= target)
        return sorted(rows, key=lambda row: list(edits).index(row["trial"]))

    return confirm_in_order, calls


@pytest.mark.parametrize("paper_kl", [0.02, 0.001])
def test_the_front_is_walked_until_a_searched_edit_meets_the_target_and_the_papers_edit_comes_last(
        monkeypatch: pytest.MonkeyPatch, paper_kl: float) -> None:
    import abliterate.confirm
    from abliterate.optimize import _confirm_trials

    table = {0: (paper_kl, 0.0), 11: (0.001, 0.2), 12: (0.002, 0.09), 13: (0.003, 0.07), 14: (0.004, 0.08),
             15: (0.005, 0.01), 16: (0.006, 0.0)}
    fake, calls = _rows(table)
    monkeypatch.setattr(abliterate.confirm, "confirm_in_order", fake)
    monkeypatch.setattr("abliterate.optimize.params_of", lambda *args: None)
    monkeypatch.setattr("abliterate.optimize.layer_directions", lambda *args: None)
    state = SimpleNamespace(candidates=SimpleNamespace(shape=(3, 4, 8)), harmless_mean=None, model=None,
                            config=OptimizeConfig(n_confirm=2))
    trials = {n: SimpleNamespace(number=n, values=[0.1, 0.001], user_attrs={}) for n in table}
    rows = _confirm_trials(state, None, None, [trials[11], trials[12]], [trials[n] for n in (13, 14, 15, 16)],
                           trials[0])
    assert [call[0] for call in calls] == [[11, 12], [13, 14], [15, 16], [0]]  # 16 confirmed beside 15, not generated
    met = [row["trial"] for row in rows if row["harmful_refusal"] is not None and row["harmful_refusal"] <= 0.05]
    paper = next(row for row in rows if row["trial"] == 0)
    assert calls[-1][1] == 0.005  # the paper's edit is generated only with less reply KL than edit 15's
    assert (paper["harmful_refusal"] is None) == (paper_kl >= 0.005)
    assert met == ([15] if paper_kl >= 0.005 else [15, 0])


def test_when_nothing_meets_the_target_stopped_generations_are_made_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """The least refusing edit then ships, so it must be compared on whole figures, not on a lower bound."""
    import abliterate.confirm
    from abliterate.confirm import choose
    from abliterate.optimize import _confirm_trials

    fake, _ = _rows({0: (0.02, 0.3), 11: (0.001, 0.4), 12: (0.002, 0.5)})
    whole = {11: 0.6, 12: 0.2, 0: 0.35}
    monkeypatch.setattr(abliterate.confirm, "confirm_in_order", fake)
    monkeypatch.setattr(abliterate.confirm, "confirm", lambda model, tokenizer, edit, held: {
        "harmful_refusal": whole[edit()], "refusal_stopped_early": False})
    monkeypatch.setattr("abliterate.optimize.params_of", lambda trial, *args: trial.number)
    monkeypatch.setattr("abliterate.optimize.layer_directions", lambda *args: None)
    monkeypatch.setattr("abliterate.optimize.hooked_edit", lambda model, params, directions: params)
    state = SimpleNamespace(candidates=SimpleNamespace(shape=(3, 4, 8)), harmless_mean=None, model=None,
                            config=OptimizeConfig(n_confirm=2))
    trials = {n: SimpleNamespace(number=n, values=[0.1, 0.001], user_attrs={}) for n in (0, 11, 12)}
    rows = _confirm_trials(state, None, None, [trials[11], trials[12]], [], trials[0])
    assert {row["trial"]: row["harmful_refusal"] for row in rows} == whole
    assert choose(rows, OptimizeConfig())["trial"] == 12


def test_the_table_marks_lower_bounds_and_what_was_not_generated() -> None:
    from abliterate.cli import _refusal_cell

    assert _refusal_cell({"harmful_refusal": None, "harmful_refusal_thinking_on": None}) == "-"
    assert _refusal_cell({"harmful_refusal": 0.3, "refusal_stopped_early": True}) == ">=0.30"
    # thinking on is generated first: a stop there leaves thinking off ungenerated
    assert _refusal_cell({"harmful_refusal": None, "harmful_refusal_thinking_on": 0.2,
                          "refusal_stopped_early": True}) == "- (thinking on >=0.20)"
    assert _refusal_cell({"harmful_refusal": 0.09, "harmful_refusal_thinking_on": 0.02,
                          "refusal_stopped_early": True}) == ">=0.09 (thinking on 0.02)"
    assert _refusal_cell({"harmful_refusal": 0.0, "harmful_refusal_thinking_on": 0.02,
                          "refusal_stopped_early": False}) == "0.00 (thinking on 0.02)"


def test_a_run_with_another_target_says_the_refining_trials_aimed_at_the_old_one(caplog) -> None:
    import logging

    from abliterate.search import _say_other_target

    trials = [_trial(0, 0.001, 0.0), _trial(1, 0.0008, 0.0, 0.8, refines=0)]
    trials[1].user_attrs["target"] = 0.05
    with caplog.at_level(logging.WARNING, logger="abliterate.search"):
        _say_other_target(trials, 0.05)
        assert not caplog.text
        _say_other_target(trials, 0.0)
    assert "toward refusal target 0.05; they are read at 0.0 now" in caplog.text
