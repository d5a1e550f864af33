"""The decoding settings as a user gives them: spec_decode and beam search options are
checked before any worker starts, and the decoding scripts write what they claim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.bench.cli import compose_config, rewrite_opt_args
from common.bench.preflight import preflight
from common.core.errors import RecipeError
from models.llama import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.scale=tiny", "hardware=cpu"]


def checked(*args: str):
    return preflight(compose_config("llama65b", rewrite_opt_args([*TINY, *args])), LlamaForCausalLM)


@pytest.mark.parametrize(
    "args, message",
    [
        (["+opt=spec_decode", "spec.method=medusa"], "unknown spec.method 'medusa'"),
        (["+opt=spec_decode", "spec.k=0"], "spec.k must be >= 1"),
        (["+opt=spec_decode", "spec.ngram.min=3", "spec.ngram.max=2"], "spec.ngram needs"),
        (["+opt=spec_decode", "generation.num_beams=2"], "do not combine"),
        (["+opt=spec_decode,no_kv_cache"], "conflict"),
        (["generation.num_beams=0"], "generation.num_beams must be >= 1"),
        (["generation.early_stopping=sometimes"], "generation.early_stopping must be"),
        (["generation.seed=-1"], "seed"),
    ],
)
def test_bad_decoding_settings_are_one_clear_error(args: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        checked(*args)


def test_good_decoding_settings_pass() -> None:
    checked("+opt=paged_kv,cont_batch,spec_decode", "spec.k=8", "spec.max_batch=4")
    checked("+opt=paged_kv", "generation.num_beams=4", "generation.early_stopping=never")
    checked("generation.do_sample=true", "generation.seed=7")


def test_spec_workloads_copy_prompts_repeat_their_passage(tmp_path: Path) -> None:
    cmd = [sys.executable, "scripts/spec_workloads.py", "--vocab", "256", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    rows = [json.loads(x) for x in (tmp_path / "copy.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for r in rows:
        ids = r["prompt_ids"]
        assert ids[-16:] == ids[:16] and all(3 <= t < 256 for t in ids)
    assert (tmp_path / "free.jsonl").read_text().count("\n") == 6


def test_sampling_table_agrees_with_transformers(tmp_path: Path) -> None:
    out = tmp_path / "sampling"
    cmd = [sys.executable, "scripts/sampling_table.py", "--vocab", "256", "--history", "24",
           "--rounds", "1", "--draws", "5", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 14 and {r["batch"] for r in rows} == {1, 16}
    assert all(r["max_abs_err"] < 1e-5 and r["same_tokens"] == 1.0 for r in rows)
