"""Fidelity: NaN or inf logits are the worst case (disagreement, infinite error), never a match."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from common.bench.fidelity import compare_logits, fidelity
from common.bench.runners import Runner
from common.core.request import Request

VOCAB = 6


def _runner(logits: dict[tuple[int, ...], torch.Tensor]) -> Runner:
    """A variant whose teacher-forced logits are fixed per prompt."""
    return Runner(
        generate=lambda reqs: [],
        teacher_forced_logits=lambda prompt, cont, stepwise=False: logits[tuple(prompt)].clone(),
        peak_kv=lambda: 0,
        groups=lambda reqs: [reqs],
    )


def _logits(*best: int) -> torch.Tensor:
    out = torch.zeros(len(best), VOCAB)
    out[range(len(best)), list(best)] = 1.0
    return out


def test_equal_logits_agree_fully() -> None:
    assert compare_logits([(_logits(1, 2), _logits(1, 2))]) == {
        "token_agreement": 1.0,
        "max_logit_err": 0.0,
    }


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("side", ["variant", "reference"])
def test_non_finite_position_disagrees_and_error_is_inf(bad: float, side: str) -> None:
    got, ref = _logits(1, 2, 3, 4), _logits(1, 2, 3, 4)
    (got if side == "variant" else ref)[2, 0] = bad
    result = compare_logits([(got, ref)])
    assert result["token_agreement"] == 0.75
    assert result["max_logit_err"] == math.inf


def test_all_nan_is_zero_agreement_not_one() -> None:
    """The bug: max(err, nan) kept err, and argmax of all-NaN rows matched (agreement 1.000)."""
    nan = torch.full((3, VOCAB), float("nan"))
    assert compare_logits([(nan, _logits(0, 0, 0))]) == {
        "token_agreement": 0.0,
        "max_logit_err": math.inf,
    }


def test_variant_with_nan_logits_reports_worst_fidelity(tmp_path: Path) -> None:
    requests = [Request([3, 4], 2), Request([5], 2)]
    outputs = [[1, 2], [3, 4]]
    good = {(3, 4): _logits(1, 2), (5,): _logits(3, 4)}
    base = fidelity(_runner(good), requests, tmp_path, True, outputs)
    assert base == {"token_agreement": 1.0, "max_logit_err": 0.0, "same_outputs": 1.0}
    broken = {**good, (5,): torch.full((2, VOCAB), float("nan"))}
    result = fidelity(_runner(broken), requests, tmp_path, False, [[1, 2], [0, 0]])
    assert result == {"token_agreement": 0.5, "max_logit_err": math.inf, "same_outputs": 0.5}


def test_baseline_with_nan_logits_does_not_claim_perfect_fidelity(tmp_path: Path) -> None:
    requests = [Request([3], 2)]
    nan = {(3,): torch.full((2, VOCAB), float("nan"))}
    result = fidelity(_runner(nan), requests, tmp_path, True, [[0, 0]])
    assert result["token_agreement"] == 0.0 and result["max_logit_err"] == math.inf
