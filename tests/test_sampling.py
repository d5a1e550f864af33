"""common.engine.sampler must match transformers' logits processors exactly, batch or ragged, and sample reproducibly."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from common.core.errors import RecipeError
from common.core.request import SamplingParams
from common.engine.sampler import make_generator, process_logits, sample

VOCAB = 40


def _inputs(seed: int, batch: int = 6, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and histories. A small id range makes repeats common, every other row ends with a copy of an
    earlier stretch (so n-grams up to 7 match), and one id lies past the vocab (transformers ignores it)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, VOCAB, generator=g) * 3
    histories = torch.randint(0, 12, (batch, length), generator=g)
    histories[::2, -6:] = histories[::2, 5:11]
    histories[0, 3] = VOCAB + 2
    return logits, histories


def _hf(params: SamplingParams) -> LogitsProcessorList:
    """The processors transformers' generate() builds for these params, in its order."""
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.do_sample:
        if params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k > 0:
            procs.append(TopKLogitsWarper(params.top_k, min_tokens_to_keep=1))
        if params.top_p < 1.0:
            procs.append(TopPLogitsWarper(params.top_p, min_tokens_to_keep=1))
    return procs


def _assert_matches_hf(
    logits: torch.Tensor, histories: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    theirs = _hf(params)(histories, logits.float().clone())
    ours = process_logits(logits, histories, params)
    assert ours.dtype == torch.float32
    assert torch.equal(ours.isneginf(), theirs.isneginf())
    assert torch.equal(ours, theirs)
    return ours


@pytest.mark.parametrize("penalty", [0.6, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty: float) -> None:
    logits, histories = _inputs(0)
    ours = _assert_matches_hf(logits, histories, SamplingParams(repetition_penalty=penalty))
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hf(n: int) -> None:
    logits, histories = _inputs(1)
    ours = _assert_matches_hf(logits, histories, SamplingParams(no_repeat_ngram_size=n))
    assert ours.isneginf().any()


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.8])
def test_temperature_matches_hf(temperature: float) -> None:
    logits, histories = _inputs(2)
    _assert_matches_hf(logits, histories, SamplingParams(do_sample=True, temperature=temperature))


@pytest.mark.parametrize("k", [1, 5, VOCAB + 10])
def test_top_k_matches_hf(k: int) -> None:
    logits, histories = _inputs(3)
    ours = _assert_matches_hf(logits, histories, SamplingParams(do_sample=True, top_k=k))
    assert (ours.isfinite().sum(-1) == min(k, VOCAB)).all()


@pytest.mark.parametrize(
    "p", [1e-8, 1e-6, 0.3, 0.9, 0.999]
)  # 1e-8: only min_tokens_to_keep survives
def test_top_p_matches_hf(p: float) -> None:
    logits, histories = _inputs(4)
    ours = _assert_matches_hf(logits, histories, SamplingParams(do_sample=True, top_p=p))
    assert ours.isfinite().any(-1).all()
    assert ours.isneginf().any()


@pytest.mark.parametrize("do_sample", [False, True])
def test_combination_matches_hf(do_sample: bool) -> None:
    logits, histories = _inputs(5)
    params = SamplingParams(
        do_sample=do_sample,
        temperature=0.8,
        top_k=12,
        top_p=0.85,
        repetition_penalty=1.4,
        no_repeat_ngram_size=2,
    )
    _assert_matches_hf(logits, histories, params)


def test_half_precision_logits_are_processed_in_float32() -> None:
    logits, histories = _inputs(6)
    params = SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    _assert_matches_hf(logits.bfloat16(), histories, params)


def test_ragged_histories_match_hf_per_row() -> None:
    # Lengths around the n-gram size catch off-by-one errors in the left-padding trick.
    n = 3
    logits, full = _inputs(7, batch=7, length=30)
    lengths = [0, 1, n - 1, n, n + 1, 17, 30]
    histories = [full[i, :length].tolist() for i, length in enumerate(lengths)]
    params = SamplingParams(
        do_sample=True, top_k=20, repetition_penalty=1.5, no_repeat_ngram_size=n
    )
    ours = process_logits(logits, histories, params)
    for i, history in enumerate(histories):
        theirs = _hf(params)(torch.tensor([history], dtype=torch.long), logits[i : i + 1].clone())
        assert torch.equal(ours[i : i + 1], theirs), f"row {i} (history length {lengths[i]})"


def test_unigram_ban_with_ragged_padding() -> None:
    # n=1 bans every seen token; the padding of the short row must not ban anything.
    logits = torch.zeros(2, VOCAB)
    ours = process_logits(logits, [[3, 5, 3], [7]], SamplingParams(no_repeat_ngram_size=1))
    assert ours.isneginf().nonzero().tolist() == [[0, 3], [0, 5], [1, 7]]


def test_input_logits_are_not_modified() -> None:
    logits, histories = _inputs(8)
    before = logits.clone()
    params = SamplingParams(do_sample=True, top_k=3, repetition_penalty=1.3, no_repeat_ngram_size=2)
    process_logits(logits, histories, params)
    assert torch.equal(logits, before)


def test_greedy_is_argmax_of_processed_logits() -> None:
    logits, _ = _inputs(9)
    # History = each row's top-3 tokens twice, so the 2-gram ban and the penalty both hit the raw argmax.
    top3 = logits.topk(3).indices
    histories = torch.cat([top3, top3], dim=1)
    params = SamplingParams(repetition_penalty=3.0, no_repeat_ngram_size=2)
    tokens = sample(logits, histories, params)
    expected = _hf(params)(histories, logits.clone()).argmax(-1)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, expected)
    # The processors must matter here, or this test could not tell argmax(processed) from argmax(raw).
    assert not torch.equal(tokens, logits.argmax(-1))


def test_greedy_ignores_warpers() -> None:
    logits, histories = _inputs(10)
    params = SamplingParams(do_sample=False, temperature=0.0, top_k=1, top_p=0.1)
    assert torch.equal(process_logits(logits, histories, params), logits)


def test_seeded_sampling_is_reproducible_and_uses_the_generator() -> None:
    logits, histories = _inputs(11, batch=64)
    params = SamplingParams(do_sample=True, temperature=1.5, seed=1234)
    first = sample(logits, histories, params, make_generator(params.seed, "cpu"))
    second = sample(logits, histories, params, make_generator(params.seed, "cpu"))
    other = sample(logits, histories, params, make_generator(params.seed + 1, "cpu"))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_make_generator_without_seed_is_none() -> None:
    assert make_generator(None, "cpu") is None


@pytest.mark.parametrize("filters", [{"top_k": 3}, {"top_p": 0.5}, {"top_k": 8, "top_p": 0.6}])
def test_sampling_only_picks_surviving_tokens(filters: dict[str, float]) -> None:
    logits, histories = _inputs(12, batch=32)
    params = SamplingParams(do_sample=True, repetition_penalty=1.2, **filters)
    allowed = process_logits(logits, histories, params).isfinite()
    generator = make_generator(0, "cpu")
    for _ in range(50):
        tokens = sample(logits, histories, params, generator)
        assert allowed.gather(1, tokens[:, None]).all()
    assert not allowed.all()


def test_per_row_params_equal_single_row_calls() -> None:
    logits, histories = _inputs(13, batch=6)
    a = SamplingParams(repetition_penalty=1.5)
    b = SamplingParams(no_repeat_ngram_size=2)
    c = SamplingParams(
        do_sample=True, top_k=1, repetition_penalty=0.5
    )  # top_k=1: deterministic sample
    per_row = [a, b, c, a, c, b]
    for hist in (histories, histories.tolist()):
        tokens = sample(logits, hist, per_row)
        expected = torch.cat(
            [sample(logits[i : i + 1], hist[i : i + 1], p) for i, p in enumerate(per_row)]
        )
        assert torch.equal(tokens, expected)
    # Mixed params must not collapse to any single shared setting.
    assert all(not torch.equal(tokens, sample(logits, histories, p)) for p in (a, b, c))


def test_per_row_random_draws_follow_row_order() -> None:
    # Distinct params per row form one group each, drawn in row order from the shared generator.
    logits, histories = _inputs(14, batch=4)
    per_row = [SamplingParams(do_sample=True, temperature=t) for t in (0.5, 1.0, 1.5, 2.0)]
    tokens = sample(logits, histories, per_row, make_generator(7, "cpu"))
    generator = make_generator(7, "cpu")
    expected = torch.cat(
        [
            sample(logits[i : i + 1], histories[i : i + 1], p, generator)
            for i, p in enumerate(per_row)
        ]
    )
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"do_sample": True, "temperature": -1.0}, "temperature"),
        ({"do_sample": True, "temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.2}, "repetition_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"seed": -3}, "seed"),
    ],
)
def test_invalid_params_raise_recipe_error(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(RecipeError, match=rf"^sampling: {name}="):
        SamplingParams(**kwargs)


def test_edge_of_valid_ranges_is_accepted() -> None:
    SamplingParams(do_sample=False, temperature=0.0)  # greedy callers may pass temperature 0
    SamplingParams(
        do_sample=True, temperature=1e-3, top_k=0, top_p=1.0, no_repeat_ngram_size=0, seed=0
    )


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(do_sample=True, temperature=0.7, top_k=5, seed=3)],
    ids=["greedy", "sampled"],
)
def test_sample_with_probs_returns_the_distribution_it_drew_from(params: SamplingParams) -> None:
    """Speculative decoding needs the processed distribution: it equals the softmax of the
    processed logits, the token is the same as sample()'s, and greedy takes its argmax."""
    from common.engine.sampler import sample_with_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    histories = [[1, 2, 3], [4], [5, 6]]
    tokens, probs = sample_with_probs(logits, histories, params, make_generator(7, "cpu"))
    want = process_logits(logits, histories, params).softmax(-1)
    torch.testing.assert_close(probs, want)
    assert torch.equal(tokens, sample(logits, histories, params, make_generator(7, "cpu")))
    if not params.do_sample:
        assert torch.equal(tokens, probs.argmax(-1))
    assert sample_with_probs(logits, histories, [params] * 3, with_probs=False)[1] is None
