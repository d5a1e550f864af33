"""Speculative decoding on a tiny seeded LLaMA, fp32: greedy output identical to
non-speculative decoding for both drafters, every KV layout and scheduler, across EOS and
max_new_tokens boundaries; sampled output distributed as the target's (accept/reject)."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
from tiny import TINY_LLAMA

from common.core.errors import RecipeError
from common.core.request import Request, SamplingParams
from common.device.select import Device
from common.engine.engine import Engine
from common.engine.scheduler import SchedulerParams
from common.engine.spec import SpecConfig
from common.engine.spec.ngram import lookup
from common.engine.spec.verify import verify
from common.io.checkpoint import from_seed
from models.llama import LlamaArgs, LlamaForCausalLM

CPU = Device("cpu")
ARGS = replace(TINY_LLAMA, max_position_embeddings=64)
# Repetitive prompts (lookup finds matches) and a plain one, of different lengths.
PROMPTS = (
    [5, 17, 33, 8, 61, 5, 17, 33, 8, 61, 5, 17],
    [40, 3, 40, 3, 40],
    [12, 70, 44, 19, 88, 2, 91],
    [77],
)
LAYOUTS = [  # (kv kind, attention, scheduler kind, int8 KV)
    ("dynamic", "eager", "static", False),
    ("contiguous", "flash", "static", False),
    ("contiguous", "eager", "static", True),
    ("paged", "eager", "static", False),
    ("paged", "flash", "continuous", False),
    ("paged", "flash", "continuous", True),
]


@functools.cache
def model(seed: int = 0, args: LlamaArgs = ARGS) -> LlamaForCausalLM:
    return from_seed(LlamaForCausalLM, args, seed, "cpu", torch.float32)


def engine(kv="dynamic", attn="eager", sched="static", int8=False, spec=None, draft=None,
           args=ARGS, max_batch=None) -> Engine:  # fmt: skip
    from common.kv.spec import KVSpec

    return Engine(
        model(0, args), CPU, KVSpec(kv, int8), attn,
        SchedulerParams(sched, max_batch=max_batch), spec=spec, draft_model=draft,
    )  # fmt: skip


def run(eng: Engine, new: int = 20, prompts=PROMPTS, **kw) -> list[list[int]]:
    return [c.tokens for c in eng.generate([Request(list(p), new, **kw) for p in prompts])]


@functools.cache
def reference(new: int = 20, args: LlamaArgs = ARGS) -> list[list[int]]:
    return run(engine(args=args), new)


def test_lookup_proposes_the_latest_continuation() -> None:
    assert lookup([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3, 3, 1) == [4, 7, 1]
    assert lookup([1, 2, 3, 1, 2], 5, 2, 1) == [3, 1, 2]  # up to the end of the sequence
    assert lookup([1, 2, 3], 2, 3, 1) == []  # no earlier match
    assert lookup([5, 6, 5], 4, 1, 1) == [6, 5]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "-".join(map(str, x)))
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_ngram_equals_plain_decoding(layout, k: int) -> None:
    kv, attn, sched, int8 = layout
    plain = run(engine(kv, attn, sched, int8))
    if not int8:
        assert plain == reference()
    eng = engine(kv, attn, sched, int8, SpecConfig("ngram", k))
    assert run(eng) == plain
    assert eng.stats["spec_steps"] > 0 and eng.stats["spec_accepted"] > 0


@pytest.mark.parametrize("layout", LAYOUTS[:1] + LAYOUTS[4:6], ids=lambda x: "-".join(map(str, x)))
def test_greedy_draft_model_equals_plain_decoding(layout) -> None:
    kv, attn, sched, int8 = layout
    # The target as its own drafter accepts everything (the bonus-token path); another
    # seed's model rejects nearly everything (the correction path).
    for draft, all_accepted in ((model(0), True), (model(1), False)):
        eng = engine(kv, attn, sched, int8, SpecConfig("draft", 3), draft)
        assert run(eng) == reference()
        s = eng.stats
        assert (s["spec_accepted"] == s["spec_proposed"]) == all_accepted


def test_eos_and_length_boundaries() -> None:
    """EOS inside an accepted run of drafts ends the sequence there; max_new_tokens is met
    exactly whatever k is."""
    ref = reference(20)
    eos = ref[0][9]  # a token the first prompt generates mid-way: make it EOS
    args = replace(ARGS, eos_token_id=eos)
    plain = run(engine(args=args), 20)
    assert plain[0][-1] == eos and len(plain[0]) < 20
    for k in (2, 5):
        for method, draft in (("ngram", None), ("draft", model(0))):
            for kv in ("dynamic", "paged"):
                eng = engine(kv, spec=SpecConfig(method, k), draft=draft, args=args)
                assert run(eng, 20) == plain
                for new in (1, 2, 7):
                    assert run(eng, new) == [t[:new] for t in run(engine(args=args), new)]


def test_spec_off_above_max_batch() -> None:
    reqs = [Request(list(p), n) for p, n in zip(PROMPTS, (3, 5, 20, 20))]
    steps = []
    for max_batch in (2, None):
        eng = engine(
            "paged", "eager", "continuous", spec=SpecConfig("ngram", 4, max_batch=max_batch)
        )
        got = [c.tokens for c in eng.generate(reqs)]
        assert got == [t[:n] for t, n in zip(reference(), (3, 5, 20, 20))]
        steps.append(eng.stats["spec_steps"])
    assert 0 < steps[0] < steps[1]  # only once two or fewer sequences run


def test_bad_spec_config() -> None:
    with pytest.raises(RecipeError, match="spec.method"):
        SpecConfig("medusa")
    with pytest.raises(RecipeError, match="spec.k"):
        SpecConfig("ngram", 0)
    with pytest.raises(RecipeError, match="kind=none"):
        engine("none", spec=SpecConfig("ngram", 2))
    with pytest.raises(RecipeError, match="draft model"):
        engine(spec=SpecConfig("draft", 2))
    other = replace(ARGS, vocab_size=80)
    with pytest.raises(RecipeError, match="vocabulary"):
        engine(spec=SpecConfig("draft", 2), draft=model(0, other))


# -- sampling: the accept/reject rule leaves the target's distribution unchanged


def test_verify_rule_is_exact() -> None:
    """Exact check of the rule on one position: P(first token = x) summed over accept and
    reject paths equals p(x), for a random p and q (computed, not sampled)."""
    g = torch.Generator().manual_seed(0)
    v = 6
    p = torch.softmax(torch.randn(v, generator=g), 0)
    q = torch.softmax(torch.randn(v, generator=g), 0)
    residual = (p - q).clamp_min(0)
    residual /= residual.sum()
    accept = torch.minimum(torch.ones(v), p / q)
    total = q * accept + (q * (1 - accept)).sum() * residual
    torch.testing.assert_close(total, p)


def _tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


@pytest.mark.parametrize("point_mass", [True, False])
def test_verify_samples_the_target_distribution(point_mass: bool) -> None:
    """2000 draws of the first token after a speculation: the empirical distribution is
    within sampling noise of p (total variation), while the drafter's q is far from it.
    Vocabulary of 16; draws are seeded so the test is deterministic."""
    g = torch.Generator().manual_seed(1)
    v, n = 16, 2000
    p_scores = torch.randn(3, v, generator=g) * 2
    p = p_scores.softmax(-1)[0]
    q = torch.softmax(torch.randn(2, v, generator=g) * 2, -1)
    params = SamplingParams(do_sample=True)
    counts = torch.zeros(v)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).T.tolist()
    for d in drafts:
        if point_mass:
            d = [int(torch.argmax(q[0])), int(torch.argmax(q[1]))]
        counts[verify(p_scores, d, None if point_mass else q, params, g)[0]] += 1
    # the noise floor of 2000 draws over 16 outcomes is ~0.04; q itself is much further
    assert _tv(counts, p) < 0.07
    assert 0.5 * float((q[0] - p).abs().sum()) > 0.3


def _first_decided_token(spec: SpecConfig, draft, n: int, temperature: float = 1.5):
    args = replace(ARGS, vocab_size=16)
    prompt = list(range(16)) * 2  # lookup finds every first token: each request speculates
    params = SamplingParams(do_sample=True, temperature=temperature)
    eng = Engine(model(0, args), CPU, "paged", "eager", SchedulerParams("continuous", max_batch=n),
                 spec=spec, draft_model=None if draft is None else model(draft, args))  # fmt: skip
    outs = eng.generate([Request(prompt, 3, params) for _ in range(n)], seed=0)
    return eng, prompt, params, [c.tokens for c in outs]


def test_engine_sampling_distribution_with_lookup() -> None:
    """End to end on a 16-token vocabulary: the second generated token (the first one a
    verification decides) has the target's exact distribution, over 1000 seeded requests."""
    eng, prompt, params, outs = _first_decided_token(SpecConfig("ngram", 2), None, 1000)
    assert eng.stats["spec_steps"] >= 1000
    from common.engine.sampler import process_logits

    with torch.inference_mode():
        p1 = process_logits(eng.teacher_forced_logits(prompt, [0])[-1:], [prompt], params)
        p1 = p1.softmax(-1)[0]
        expect = torch.zeros(16)
        for t in range(16):
            logits = eng.teacher_forced_logits(prompt, [t, 0])[-1:]
            expect += p1[t] * process_logits(logits, [prompt + [t]], params).softmax(-1)[0]
    counts = torch.bincount(torch.tensor([t[1] for t in outs]), minlength=16).float()
    assert _tv(counts, expect) < 0.08


def test_engine_sampling_with_draft_model_uses_its_q() -> None:
    """The target as its own drafter: q == p at every position, so min(1, p/q) = 1 and every
    sampled draft is accepted; a misaligned q (wrong position or history) would reject."""
    eng, *_ = _first_decided_token(SpecConfig("draft", 2), 0, 40)
    assert eng.stats["spec_proposed"] > 0
    assert eng.stats["spec_accepted"] == eng.stats["spec_proposed"]
    eng, *_ = _first_decided_token(SpecConfig("draft", 2), 1, 40)
    assert eng.stats["spec_accepted"] < eng.stats["spec_proposed"]
