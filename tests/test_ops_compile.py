"""The custom kernels are registered torch ops: opcheck validates their registration (schema,
fake implementation, no aliasing), and torch.compile(fullgraph=True) traces through each one
and through the dispatched entry points. aot_eager keeps each compile to a second or two."""

import pytest
import torch

from common import ops
from common.ops.attention import attention_cpp, dense_decode_cpp
from common.ops.int8_linear import int8_dequant_cpp, int8_matvec_cpp
from common.ops.library import registered
from common.ops.rms_norm import add_rms_norm_cpp, rms_norm_cpp
from common.ops.rotary import rotary_cpp


@pytest.fixture(autouse=True)
def _own_choices(tmp_path):
    ops.reset(tmp_path / "choices.json")
    torch._dynamo.reset()
    yield
    ops.reset()


def _int8_args(dtype=torch.bfloat16, group: int = 0) -> tuple:
    w = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    scales = (torch.rand((48, 64 // group) if group else (48,)) / 50).to(dtype)
    return torch.randn(2, 64, dtype=dtype), w, scales, group


def _attention_args(int8: bool):
    """A pool of 6 blocks of 4 tokens, 2 rows, 4 query heads over 2 KV heads."""
    k = torch.randn(6, 4, 2, 16)
    v = torch.randn(6, 4, 2, 16)
    scales = (None, None)
    if int8:
        scales = (torch.rand(6, 4, 2, 1).half(), torch.rand(6, 4, 2, 1).half())
        k, v = (torch.randint(-127, 128, t.shape, dtype=torch.int8) for t in (k, v))
    tables = torch.tensor([[3, 0], [5, 1]], dtype=torch.int32)
    q_pos, lens = torch.tensor([[6], [2]]), torch.tensor([7, 3])
    return (torch.randn(2, 4, 1, 16), k, v, *scales, tables, q_pos, lens, 4, [0, 1, 2])


CASES = {
    "rms_norm_cpp": (rms_norm_cpp, lambda: (torch.randn(3, 32), torch.randn(32), 1e-5)),
    "rms_norm_cpp_bf16": (
        rms_norm_cpp,
        lambda: (torch.randn(3, 32).bfloat16(), torch.randn(32).bfloat16(), 1e-5),
    ),
    "add_rms_norm_cpp_bf16": (
        add_rms_norm_cpp,
        lambda: (*torch.randn(2, 3, 32).bfloat16(), torch.randn(32).bfloat16(), 1e-5),
    ),
    "rotary_cpp": (
        rotary_cpp,
        lambda: (
            torch.randn(2, 3, 4, 16).transpose(1, 2),  # q [B, H, T, D], strided as projected
            torch.randn(2, 3, 2, 16).transpose(1, 2),
            torch.randn(2, 3, 8),
            torch.randn(2, 3, 8),
            True,
        ),
    ),
    "int8_matvec_cpp": (int8_matvec_cpp, _int8_args),
    "int8_matvec_cpp_fp32": (int8_matvec_cpp, lambda: _int8_args(torch.float32)),
    "int8_matvec_cpp_g32": (int8_matvec_cpp, lambda: _int8_args(group=32)),
    "int8_dequant_cpp_g32": (int8_dequant_cpp, lambda: _int8_args(group=32)[1:]),
    "attention_cpp": (attention_cpp, lambda: _attention_args(False)),
    "attention_cpp_int8": (attention_cpp, lambda: _attention_args(True)),
}


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    fn, args = CASES[case]
    torch.library.opcheck(registered(fn), args())


@pytest.mark.parametrize(
    "case",
    [
        "rms_norm_cpp",
        "add_rms_norm_cpp_bf16",
        "rotary_cpp",
        "int8_matvec_cpp",
        "attention_cpp_int8",
    ],
)
def test_compile_traces_through_each_op(case):
    fn, make = CASES[case]
    args = make()
    compiled = torch.compile(lambda *a: _twice(fn(*a)), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), _twice(fn(*args)), rtol=0, atol=0)


def _twice(out):
    """The op's output(s) used by another op in the graph."""
    return tuple(t * 2 for t in out) if isinstance(out, tuple) else out * 2


@pytest.mark.parametrize("pins", ["", "rms_norm=cpp,int8_linear=cpp_matvec,decode_attention=cpp"])
def test_compile_traces_through_the_dispatched_entry_points(pins):
    """The choice is resolved at trace time (a constant); the graph holds the chosen kernel
    (measured, or pinned to the C++ kernels)."""
    ops.pin(pins)
    x, w = torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    xi, wi, s, g = _int8_args(group=32)  # group-wise scales: the group size is a constant
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)

    def step(x, w, xi, wi, s, q, k, v):
        h = ops.rms_norm(x, w, 1e-5)
        return h, ops.int8_linear(xi, wi, s, g), ops.decode_attention(q, k, v, None)

    args = (x, w, xi, wi, s, q, k, v)
    want = step(*args)  # eager first: measures and caches the choice the trace then uses
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dense_decode_compiles():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    lens = torch.tensor([9, 4])
    compiled = torch.compile(dense_decode_cpp, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, lens), dense_decode_cpp(q, k, v, lens))
