"""common.engine.Engine on a tiny seeded LLaMA: batching, KV kinds, backends, stopping, sampling,
bad input. fp32 throughout, so greedy tokens must match exactly."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
from tiny import TINY_LLAMA

from common.attention.backends import cpu_flash_attention, eager_attention
from common.attention.meta import AttnMeta
from common.core.errors import RecipeError
from common.core.request import Completion, Request, SamplingParams
from common.device.select import Device
from common.engine.engine import Engine
from common.engine.scheduler import SchedulerParams
from common.io.checkpoint import from_seed
from models.llama import LlamaArgs, LlamaForCausalLM

CPU = Device("cpu")
KV_KINDS = ("dynamic", "contiguous", "none")
BACKENDS = ("eager", "sdpa", "flash")  # flash on cpu: the C++ kernel for decode
ARGS = replace(TINY_LLAMA, max_position_embeddings=48)
SEED = 0
# Prompts of different lengths, so a batch of them is right-padded.
PROMPTS = ([5, 17, 33, 8, 61, 22, 9], [40, 3], [12, 70, 44, 19, 88], [77])
NEW = 6


@functools.cache
def model(args: LlamaArgs = ARGS) -> LlamaForCausalLM:
    """Weights depend only on the dims and the seed, not on eos_token_id."""
    return from_seed(LlamaForCausalLM, args, SEED, "cpu", torch.float32)


def engine(kv: str = "dynamic", attn: str = "eager", args: LlamaArgs = ARGS) -> Engine:
    return Engine(model(args), CPU, kv_kind=kv, attention=attn)


def greedy(
    eng: Engine, prompts: tuple[list[int], ...] | list[list[int]], new: int = NEW, **kw
) -> list[Completion]:
    return eng.generate([Request(list(p), new, **kw) for p in prompts])


def tokens(completions: list[Completion]) -> list[list[int]]:
    return [c.tokens for c in completions]


@functools.cache
def reference() -> list[list[int]]:
    """Each prompt alone: dynamic cache, eager attention (the unoptimized path)."""
    return [greedy(engine(), [p])[0].tokens for p in PROMPTS]


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("kv", KV_KINDS)
def test_prompt_alone_equals_prompt_in_padded_batch(kv: str, attn: str) -> None:
    eng = engine(kv, attn)
    alone = [greedy(eng, [p])[0].tokens for p in PROMPTS]
    assert tokens(greedy(eng, PROMPTS)) == alone
    # Longest row in a different slot, and batches of two.
    order = [3, 1, 0, 2]
    shuffled = greedy(eng, [PROMPTS[i] for i in order])
    assert tokens(shuffled) == [alone[i] for i in order]
    assert tokens(greedy(eng, PROMPTS[1:3])) == alone[1:3]


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("kv", KV_KINDS)
def test_all_kv_kinds_and_backends_agree(kv: str, attn: str) -> None:
    got = [greedy(engine(kv, attn), [p])[0] for p in PROMPTS]
    assert [c.tokens for c in got] == reference()
    assert all(len(c.tokens) == NEW and c.finish_reason == "length" for c in got)
    assert all(len(c.token_times) == NEW for c in got)


def test_reference_is_not_degenerate() -> None:
    """Guards the tests above: equal outputs must not come from a constant model."""
    ref = reference()
    assert len({tuple(t) for t in ref}) == len(ref)
    assert any(len(set(t)) > 1 for t in ref)


def _eos_case(step: int = 2) -> tuple[LlamaArgs, list[int], list[int]]:
    """(args whose EOS is the token greedily emitted at `step` of PROMPTS[0], prompt, tokens
    without EOS). The token is its first occurrence, so generation must stop exactly there."""
    full = reference()[0]
    step = next(i for i in range(step, len(full)) if full[i] not in full[:i])
    return replace(ARGS, eos_token_id=full[step]), list(PROMPTS[0]), full[: step + 1]


@pytest.mark.parametrize("kv", KV_KINDS)
def test_stops_on_eos(kv: str) -> None:
    args, prompt, expected = _eos_case()
    (c,) = greedy(engine(kv, args=args), [prompt])
    assert c.tokens == expected
    assert c.finish_reason == "eos"


def test_eos_as_list_of_ids() -> None:
    args, prompt, expected = _eos_case()
    args = replace(args, eos_token_id=(ARGS.vocab_size - 1, args.eos_token_id))
    (c,) = greedy(engine(args=args), [prompt])
    assert (c.tokens, c.finish_reason) == (expected, "eos")


@pytest.mark.parametrize("kv", KV_KINDS)
def test_row_stopping_on_eos_does_not_disturb_its_batch(kv: str) -> None:
    args, _, _ = _eos_case()
    eng = engine(kv, args=args)
    alone = [greedy(eng, [p])[0] for p in PROMPTS]
    batch = greedy(eng, PROMPTS)
    assert [(c.tokens, c.finish_reason) for c in batch] == [
        (c.tokens, c.finish_reason) for c in alone
    ]
    assert batch[0].finish_reason == "eos"
    assert any(c.finish_reason == "length" for c in batch)


def test_ignore_eos_runs_to_max_new_tokens() -> None:
    args, prompt, _ = _eos_case()
    (c,) = greedy(engine(args=args), [prompt], ignore_eos=True)
    assert c.tokens == reference()[0]
    assert c.finish_reason == "length"


@pytest.mark.parametrize("new", [1, 3])
def test_stops_at_max_new_tokens(new: int) -> None:
    batch = greedy(engine(), PROMPTS, new=new)
    assert tokens(batch) == [t[:new] for t in reference()]
    assert all(c.finish_reason == "length" and len(c.token_times) == new for c in batch)


def test_mixed_max_new_tokens_in_one_batch() -> None:
    eng = engine("contiguous")
    reqs = [Request(list(p), n) for p, n in zip(PROMPTS, (1, NEW, 3, 2))]
    assert tokens(eng.generate(reqs)) == [t[:n] for t, n in zip(reference(), (1, NEW, 3, 2))]


@pytest.mark.parametrize("kv", KV_KINDS)
def test_stops_at_max_positions(kv: str) -> None:
    room = 2
    prompt = [(7 * i) % ARGS.vocab_size for i in range(ARGS.max_position_embeddings - room)]
    (c,) = greedy(engine(kv), [prompt], new=10)
    assert len(c.tokens) == room
    assert c.finish_reason == "length"
    assert c.truncated  # the bench warns: fewer tokens than max_new_tokens asked for
    (c,) = greedy(engine(kv), [prompt], new=room)
    assert not c.truncated


@pytest.mark.parametrize("kv", KV_KINDS)
def test_stop_sequence_ends_generation_with_it(kv: str) -> None:
    full = reference()[0]
    stop = tuple(full[2:4])
    first = next(i for i in range(1, len(full)) if tuple(full[i - 1 : i + 1]) == stop)
    (c,) = greedy(engine(kv), [PROMPTS[0]], stop_sequences=((999,), stop))
    assert (c.tokens, c.finish_reason) == (full[: first + 1], "stop")


class CharTokenizer:
    """Token i decodes to chr(ord('a') + i % 26): enough to test stop strings."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_string_needs_a_tokenizer_and_stops_on_it() -> None:
    full = reference()[0]
    text = CharTokenizer().decode(full)
    stop = text[3:5]
    end = text.index(stop) + len(stop)
    with pytest.raises(RecipeError, match="tokenizer"):
        greedy(engine(), [PROMPTS[0]], stop_strings=(stop,))
    eng = Engine(model(), CPU, tokenizer=CharTokenizer())
    (c,) = eng.generate([Request(list(PROMPTS[0]), NEW, stop_strings=(stop,))])
    assert (c.tokens, c.finish_reason) == (full[:end], "stop")


@pytest.mark.parametrize("kv", KV_KINDS)
def test_static_batches_of_online_arrivals_on_row_storage(kv: str) -> None:
    """Online static batching on row KV: a batch takes the requests that have arrived (up to
    max_batch) and runs to its longest member; outputs as alone, times from arrival."""
    eng = Engine(model(), CPU, kv, scheduler=SchedulerParams("static", max_batch=2))
    reqs = [Request(list(p), NEW) for p in PROMPTS]
    outs = eng.generate(reqs, arrivals=[0.0, 0.0, 0.01, 0.3])
    assert tokens(outs) == reference()
    assert all(0 < c.ttft <= c.token_times[-1] for c in outs)


def _sampled(eng: Engine, seed: int | None, **params) -> list[list[int]]:
    sampling = SamplingParams(do_sample=True, **params)
    reqs = [Request(list(p), NEW, sampling=sampling) for p in PROMPTS]
    return tokens(eng.generate(reqs, seed=seed))


@pytest.mark.parametrize("params", [{}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}])
def test_sampling_is_reproducible_with_a_seed(params: dict) -> None:
    eng = engine("contiguous", "sdpa")
    first = _sampled(eng, 1234, **params)
    assert _sampled(eng, 1234, **params) == first
    assert _sampled(engine(), 1234, **params) == first  # the KV kind does not change the draw
    assert _sampled(eng, 4321, **params) != first
    assert first != tokens(greedy(eng, PROMPTS))


def test_sampling_without_seed_uses_global_rng() -> None:
    eng = engine()
    torch.manual_seed(7)
    first = _sampled(eng, None)
    torch.manual_seed(7)
    assert _sampled(eng, None) == first


@pytest.mark.parametrize(
    "request_kw, message",
    [
        ({"prompt": [1, 2], "max_new_tokens": 0}, "max_new_tokens must be > 0, got 0"),
        ({"prompt": [1, 2], "max_new_tokens": -3}, "max_new_tokens must be > 0, got -3"),
        ({"prompt": [], "max_new_tokens": 4}, "empty prompt"),
        (
            {"prompt": [3] * ARGS.max_position_embeddings, "max_new_tokens": 4},
            f"prompt of {ARGS.max_position_embeddings} tokens does not fit",
        ),
        (
            {"prompt": [3] * (ARGS.max_position_embeddings + 5), "max_new_tokens": 1},
            "max positions",
        ),
        ({"prompt": [3, ARGS.vocab_size], "max_new_tokens": 4}, f"[0, {ARGS.vocab_size})"),
        ({"prompt": [3, -1], "max_new_tokens": 4}, f"[0, {ARGS.vocab_size})"),
    ],
    ids=[
        "zero_new",
        "negative_new",
        "empty",
        "at_max_pos",
        "past_max_pos",
        "id_eq_vocab",
        "neg_id",
    ],
)
def test_bad_request_is_a_recipe_error(request_kw: dict, message: str) -> None:
    eng = engine()
    bad = Request(**request_kw)
    with pytest.raises(RecipeError) as e:
        eng.generate([Request([4, 5], 2), bad])  # one bad request fails the whole batch
    assert message in str(e.value)


@pytest.mark.parametrize("kv, attn", [("bogus", "eager"), ("dynamic", "nope")])
def test_unknown_kv_kind_or_backend_names_the_choices(kv: str, attn: str) -> None:
    with pytest.raises(RecipeError, match="choose one of"):
        engine(kv, attn)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_hf_peer_gives_the_engine_tokens(ignore_eos: bool) -> None:
    """The `hf` peer row (transformers' generate()) on the same weights: same greedy tokens,
    also when EOS is emitted but ignored (EOS must not be suppressed, nor stop the row),
    and the same stop rule (a stop sequence in the second row)."""
    from common.bench.peers import hf_runner

    args, _, _ = _eos_case()
    stop = (tuple(reference()[1][1:3]),)
    kw = [{}, {"stop_sequences": stop}]
    reqs = [Request(list(p), NEW, ignore_eos=ignore_eos, **k) for p, k in zip(PROMPTS, kw)]
    ours = engine(args=args).generate(reqs)
    assert ours[1].finish_reason == "stop"
    theirs = hf_runner(model(args), max_batch=len(reqs)).generate(reqs)
    assert [(c.tokens, c.finish_reason) for c in theirs] == [
        (c.tokens, c.finish_reason) for c in ours
    ]
    assert (ours[0].finish_reason == "eos") != ignore_eos


def test_cpu_flash_decode_routes_by_the_keys_each_row_sees() -> None:
    """One query per row: keys with holes (left padding) take eager attention itself; a prefix
    per row takes decode_attention (the C++ kernel or SDPA), equal to eager within rounding."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 8, generator=g) for h, n in ((4, 1), (2, 6), (2, 6)))
    holes = AttnMeta(
        mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6], dtype=torch.bool)[:, None, None]
    )
    assert torch.equal(cpu_flash_attention(q, k, v, holes), eager_attention(q, k, v, holes))
    prefix = AttnMeta(
        mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool)[:, None, None]
    )
    assert prefix.prefix_lens is not None
    torch.testing.assert_close(
        cpu_flash_attention(q, k, v, prefix), eager_attention(q, k, v, prefix)
    )
