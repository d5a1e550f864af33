"""The dispatch table: a short measurement on first use per bucket, cached in a JSON file and
read back instead of measuring again; pins by API and environment; what ran is reported."""

import json

import pytest
import torch

from common import ops
from common.core.errors import RecipeError
from common.ops import dispatch
from common.ops.dispatch import Impl, Op


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    path = tmp_path / "choices.json"
    ops.reset(path)
    yield path
    ops.reset()


def _toy_op(name: str, calls: list[str]) -> Op:
    """'slow' keeps the CPU busy, 'fast' does not, 'wide' is allowed only for an even width
    (a rule on the arguments, like int8pack_mm's K % 16)."""

    def impl(label: str, seconds: float):
        def run(x: torch.Tensor) -> torch.Tensor:
            calls.append(label)
            torch.ones(int(seconds * 1e8)).sum() if seconds else None  # busy, not asleep
            return x * 2

        return run

    return Op(
        name,
        [
            Impl("slow", impl("slow", 0.01)),
            Impl("fast", impl("fast", 0.0)),
            Impl("wide", impl("wide", 0.0), when=lambda x: x.shape[1] % 2 == 0),
        ],
        rows=lambda x: x.shape[0],
        size=lambda x: x.shape[1] * x.element_size(),
    )


def test_measures_once_then_reads_the_cache(cache, monkeypatch):
    calls: list[str] = []
    op = _toy_op("toy_measure", calls)
    assert torch.equal(op(torch.ones(1, 3)), torch.full((1, 3), 2.0))
    assert {"slow", "fast"} <= set(calls) and "wide" not in calls  # both timed, wide not allowed
    ranking = json.loads(cache.read_text())["toy_measure[cpu,float32,rows=1,bytes<=16]"]
    assert list(ranking) == ["fast", "slow"] and ranking["fast"] < ranking["slow"]  # us per call
    assert ops.chosen()["toy_measure[cpu,float32,rows=1,bytes<=16]"] == "fast"

    # Another process: the file answers, nothing is timed.
    ops.reset(cache)
    monkeypatch.setattr(dispatch, "_time", lambda *a: pytest.fail("measured again"))
    calls.clear()
    op(torch.ones(1, 3))
    assert calls == ["fast"]


def test_an_implementation_allowed_later_is_measured_then(cache):
    calls: list[str] = []
    op = _toy_op("toy_later", calls)
    op(torch.ones(1, 3))  # wide not allowed: ranked without it
    op(torch.ones(1, 4))  # same bucket, wide allowed now: measured again, with it
    ranking = json.loads(cache.read_text())["toy_later[cpu,float32,rows=1,bytes<=16]"]
    assert set(ranking) == {"slow", "fast", "wide"} and list(ranking)[-1] == "slow"
    assert ops.chosen()["toy_later[cpu,float32,rows=1,bytes<=16]"] in ("fast", "fast, wide")


def test_buckets():
    def label(rows: int, nbytes: int) -> str:
        key = ("op", "cpu", torch.float32, dispatch._BUCKET_OF[min(rows, 257)])
        return dispatch._label((*key, dispatch._size_class(nbytes)))

    rows = [label(r, 1).split(",")[2] for r in (1, 2, 3, 5, 16, 17, 65, 256, 257, 4096)]
    assert rows == [
        "rows=1", "rows=2", "rows=3-4", "rows=5-8", "rows=9-16", "rows=17-64", "rows=65-256",
        "rows=65-256", "rows=257+", "rows=257+",
    ]  # fmt: skip
    sizes = [label(1, n).split(",")[3] for n in (0, 16, 17, 4096, 1 << 20, (16 << 20) + 1)]
    assert sizes == [
        "bytes<=16]", "bytes<=16]", "bytes<=256]", "bytes<=4K]", "bytes<=1M]", "bytes>16M]",
    ]  # fmt: skip


def test_pin_by_api_and_environment(cache, monkeypatch):
    calls: list[str] = []
    op = _toy_op("toy_pin", calls)
    ops.pin({"toy_pin": "slow"})
    op(torch.ones(1, 4))
    assert calls == ["slow"]  # no measurement
    assert ops.chosen() == {"toy_pin[cpu,float32,rows=1,bytes<=16]": "slow (pinned)"}

    monkeypatch.setenv(dispatch.ENV, "toy_pin=wide")
    ops.reset(cache)
    calls.clear()
    op(torch.ones(1, 4))
    op(torch.ones(1, 3))  # wide's rule fails at an odd width: the measured ranking decides
    assert calls[0] == "wide" and calls[-1] == "fast"


def test_bad_pins_name_the_choices(cache):
    _toy_op("toy_bad", [])
    with pytest.raises(
        RecipeError, match="unknown kernel 'nope' for toy_bad; choose one of slow, fast, wide"
    ):
        ops.pin("toy_bad=nope")
    with pytest.raises(RecipeError, match="op=implementation"):
        ops.pin("toy_bad")
    ops.pin("later_op=x")  # not registered yet: checked when it registers
    with pytest.raises(RecipeError, match="unknown kernel 'x' for later_op"):
        Op("later_op", [Impl("y", lambda x: x)], rows=lambda x: 1, size=lambda x: 1)


def test_a_variant_choice_is_measured_once_cached_and_pinned(cache, monkeypatch):
    """choose_variant: a choice that is no op call (how a compiler lowers a graph), ranked,
    cached, pinned and reported like an op."""
    built: list[str] = []

    def variant(name: str, seconds: float):
        def make():
            built.append(name)
            return lambda: torch.ones(int(seconds * 1e8)).sum() if seconds else None

        return make

    variants = {"slow": variant("slow", 0.01), "fast": variant("fast", 0.0)}
    label = "toy_variant[cpu,float32,rows=1,bytes>16M]"

    def choose() -> str:
        return dispatch.choose_variant("toy_variant", variants, "cpu", torch.float32, 1, 1 << 30)

    assert choose() == "fast" and sorted(built) == ["fast", "slow"]
    assert list(json.loads(cache.read_text())[label]) == ["fast", "slow"]
    assert ops.chosen()[label] == "fast"
    ops.reset(cache)  # another process: the file answers, nothing is built or timed
    built.clear()
    assert choose() == "fast" and built == []
    monkeypatch.setenv(dispatch.ENV, "toy_variant=slow")
    ops.reset(cache)
    assert choose() == "slow" and built == [] and ops.chosen()[label] == "slow (pinned)"
    ops.pin("toy_variant=nope")
    with pytest.raises(
        RecipeError, match="unknown kernel 'nope' for toy_variant; choose one of slow, fast"
    ):
        choose()


def test_real_ops_every_choice_matches(cache):
    """Whatever the measurement picks here, the module output matches the reference."""
    from common.ops.int8_linear import dequant_mm
    from common.ops.rms_norm import rms_norm_torch

    x, w = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), rms_norm_torch(x, w, 1e-6))
    wi = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    s = (torch.rand(32) / 50).bfloat16()
    torch.testing.assert_close(
        ops.int8_linear(x, wi, s), dequant_mm(x, wi, s), rtol=2e-2, atol=1e-2
    )
    assert set(ops.chosen()) == {
        "rms_norm[cpu,bfloat16,rows=3-4,bytes<=256]",  # a 64-wide bf16 row
        "int8_linear[cpu,bfloat16,rows=3-4,bytes<=4K]",  # a 32 x 64 int8 weight
    }
