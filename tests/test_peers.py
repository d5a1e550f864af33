"""Peer rows without the peer engines: which rows a run plans, the one-line errors for a
missing or unsupported peer, the server protocol's failure path, and argmax-only fidelity.
llama.cpp and vLLM are optional; nothing here needs either."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.bench.cli import compose_config, rewrite_opt_args
from common.bench.fidelity import compare_logits
from common.bench.peer_process import PeerProcess
from common.bench.peers import gguf_format, opt_quant
from common.bench.plan import plan
from common.bench.preflight import preflight
from common.core.config import CONFIG_DIR
from common.core.errors import RecipeError
from common.transforms.registry import opt_specs
from models.glm import GlmForCausalLM
from models.llama import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.scale=tiny", "hardware=cpu"]


def checked(*args: str, recipe: str = "llama65b", model_cls: type = LlamaForCausalLM):
    return preflight(compose_config(recipe, rewrite_opt_args([*TINY, *args])), model_cls)


def test_llama_cpp_rows_follow_each_rows_quantization() -> None:
    """A ladder ending in int8 gets llama.cpp at the model's dtype and at q8_0; each peer row
    carries the opts of the first row of its format (the worker reads quant.weights there)."""
    specs = opt_specs(CONFIG_DIR)
    peers = ["hf", "llama_cpp", "vllm"]
    variants = plan(["flash_attn", "int8"], True, False, peers, None, specs, "bfloat16")
    assert [(v.name, v.opts, v.peer) for v in variants] == [
        ("baseline", [], None),
        ("+flash_attn", ["flash_attn"], None),
        ("+flash_attn +int8", ["flash_attn", "int8"], None),
        ("hf generate()", [], "hf"),
        ("llama.cpp bf16", [], "llama_cpp"),
        ("llama.cpp q8_0", ["flash_attn", "int8"], "llama_cpp"),
        ("vLLM", [], "vllm"),
    ]
    fp32 = plan(["flash_attn"], False, False, ["llama_cpp"], None, specs, "float32")
    assert [v.name for v in fp32] == ["baseline", "flash_attn", "llama.cpp f32"]


def test_a_rows_quantization_comes_from_its_opts_or_its_own_override() -> None:
    assert opt_quant(["flash_attn"]) == "none"
    assert opt_quant(["flash_attn", "int8"]) == "int8"
    assert opt_quant(["int8", "quant.weights=int4"]) == "int4"


def test_a_scheme_without_a_llama_cpp_format_is_named() -> None:
    assert (gguf_format("int8", "bfloat16"), gguf_format("int4", "bfloat16")) == ("q8_0", "q4_0")
    assert gguf_format("w4a8", "bfloat16") == "q4_0"  # llama.cpp's q4_0 runs int8 activations
    with pytest.raises(
        RecipeError, match="no format for quant.weights='nf4'; it maps int8 to q8_0"
    ):
        gguf_format("nf4", "bfloat16")


def test_missing_llama_cpp_names_its_install_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(RecipeError) as e:
        checked("bench.peers=[llama_cpp]")
    assert re.fullmatch(
        r"bench\.peers=\[llama_cpp\] needs llama_cpp \(not installed in .*\); "
        r"install it with scripts/install_peers\.sh llama_cpp",
        str(e.value),
    )


def test_llama_cpp_refuses_glm_with_what_it_supports() -> None:
    with pytest.raises(RecipeError, match="converts LlamaForCausalLM checkpoints only, not Glm"):
        checked("bench.peers=[llama_cpp]", recipe="chatglm", model_cls=GlmForCausalLM)


def test_missing_vllm_is_one_line_and_a_nonzero_exit(tmp_path) -> None:
    """The whole CLI: preflight fails before any worker, with the install command."""
    proc = subprocess.run(
        [sys.executable, "recipes/llama65b/run.py", *TINY, "bench.peers=[vllm]",
         f"bench.peer_python={tmp_path}/no-venv/bin/python", f"bench.results_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert (
        "install it with scripts/install_peers.sh vllm or give bench.peer_python=PATH" in lines[0]
    )
    assert not list(tmp_path.rglob("*.json"))  # nothing written


def test_a_peer_server_that_cannot_start_is_one_line_with_its_log() -> None:
    """The real protocol: a vllm server started by an interpreter without vLLM fails its
    setup, and the error names the exception and keeps the server's log."""
    if subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode == 0:
        pytest.skip("vllm is importable here")
    with pytest.raises(RecipeError) as e:
        PeerProcess("vllm", sys.executable, {"model": "x"}, {})
    m = re.fullmatch(
        r"vllm peer failed: ModuleNotFoundError: No module named 'vllm' \(log: (.*)\)", str(e.value)
    )
    assert m, str(e.value)
    assert "Traceback" in Path(m.group(1)).read_text()
    Path(m.group(1)).unlink()


def test_argmax_only_fidelity_counts_agreement_without_an_error() -> None:
    ref = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    got = torch.tensor([1, 0, 0])  # a peer's teacher-forced greedy ids: 2 of 3 agree
    out = compare_logits([(got, ref)])
    assert out["token_agreement"] == pytest.approx(2 / 3)
    assert math.isnan(out["max_logit_err"])


def test_llama_cpp_peer_gives_transformers_tokens_and_logits() -> None:
    """Where llama-cpp-python is installed (CI does not install it): the GGUF written from our
    fp32 weights, run by llama.cpp at f32, greedy-decodes what transformers' generate() does
    on the same weights, with teacher-forced logits within float32 rounding."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (scripts/install_peers.sh llama_cpp)")
    from common.bench.peers import hf_runner, peer_runner
    from common.core.request import Request
    from common.io.checkpoint import from_seed
    from tests.tiny import TINY_LLAMA

    args = dataclasses.replace(TINY_LLAMA, hidden_size=64, bos_token_id=1, eos_token_id=2)
    model = from_seed(LlamaForCausalLM, args, 0, "cpu", torch.float32)
    cfg = compose_config("llama65b", [*TINY, "model.dtype=float32", "bench.peers=[llama_cpp]"])
    reqs = [Request([5, 17, 3, 40, 8, 9], 8, ignore_eos=True), Request([60, 2, 33], 8, ignore_eos=True)]  # fmt: skip
    ours = hf_runner(model, max_batch=1).generate(reqs[:1]) + hf_runner(model, 1).generate(reqs[1:])
    runner = peer_runner("llama_cpp", model, cfg, reqs)
    theirs = [runner.generate([r])[0] for r in reqs]
    assert [c.tokens for c in theirs] == [c.tokens for c in ours]
    assert all(len(c.token_times) == 8 for c in theirs)
    got = runner.teacher_forced_logits(reqs[0].prompt, ours[0].tokens)
    ref = hf_runner(model, 1).teacher_forced_logits(reqs[0].prompt, ours[0].tokens)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    assert runner.weight_bytes > runner.decode_weight_bytes > 0
