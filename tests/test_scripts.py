"""Scripts behind committed results, run at tiny scale: they work and write what they claim."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny import hf_llama_checkpoint

from common.ops.build import cache_dir

ROOT = Path(__file__).resolve().parents[1]


def test_fidelity_floor_on_a_checkpoint_compares_every_pair(tmp_path: Path) -> None:
    hf_llama_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "floor"
    cmd = [sys.executable, "scripts/fidelity_floor.py", "--model-path", str(tmp_path / "ckpt"),
           "--workload", "latency", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    rows = {r["pair"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert len(rows) == 4
    assert all(0 <= r["token_agreement"] <= 1 for r in rows.values())
    assert 0 < rows["bf16 vs fp32"]["rms_logit_err"] < rows["bf16 vs fp32"]["logit_std"]
    bad = subprocess.run(
        [*cmd[:-4], "--workload", "nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown workload 'nope'" in bad.stderr


def test_attention_prefill_table_writes_both_backends_per_length(tmp_path: Path) -> None:
    out = tmp_path / "attention_prefill"
    cmd = [sys.executable, "scripts/attention_prefill_table.py", "--scale", "tiny",
           "--lengths", "16", "32", "--rounds", "1", "--repeats", "1", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(r["tokens"], r["backend"]) for r in result["rows"]] == [
        (16, "eager"), (16, "flash"), (32, "eager"), (32, "flash")
    ]  # fmt: skip
    assert all(r["ms"] > 0 and r["extra_bytes"] >= 0 for r in result["rows"])
    table = out.with_suffix(".md").read_text()
    assert "| 32 | fused (flash_attn: SDPA) |" in table and result["cpu"] in table


def test_support_matrix_reads_committed_results(tmp_path: Path) -> None:
    table = {"hardware": "cpu", "model": "llama-65b, seeded, bfloat16",
             "variants": [{"opts": [], "peer": None}, {"opts": ["paged_kv", "flash_attn"]},
                          {"opts": [], "peer": "hf"}]}  # fmt: skip
    (tmp_path / "llama65b" / "cpu").mkdir(parents=True)
    (tmp_path / "llama65b" / "cpu" / "t.json").write_text(json.dumps(table))
    # a run given a results dir of its own (bench.results_dir=results/quant/smollm2)
    nested = {**table, "variants": [{"opts": ["int8"]}]}
    (tmp_path / "quant" / "smollm2" / "llama65b" / "cpu").mkdir(parents=True)
    (tmp_path / "quant" / "smollm2" / "llama65b" / "cpu" / "t.json").write_text(json.dumps(nested))
    cmd = [
        sys.executable,
        "scripts/support_matrix.py",
        "--recipe",
        "llama65b",
        "--results",
        str(tmp_path),
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    rows = json.loads((tmp_path / "llama65b" / "support_matrix.json").read_text())["rows"]
    assert rows["paged_kv"]["cpu bfloat16"] == "measured (1)"
    assert rows["paged_kv"]["cpu float32"] == "not measured"
    assert rows["int8"]["cpu bfloat16"] == "measured (1)"
    assert rows["int8"]["npu bfloat16"] == "unverified"
    assert rows["int4"]["cpu bfloat16"] == "not measured"
    assert rows["baseline"]["cpu bfloat16"] == "measured (1)"  # one table: the nested has none


def test_decode_profile_counts_fewer_kernel_calls_when_fused(tmp_path: Path) -> None:
    """Counts, not speed: the fuse opt replaces separate add/norm, rotary and projection
    calls, so a fused step calls fewer ops; the C++ kernels show by their op names."""
    out = tmp_path / "decode_profile"
    cmd = [sys.executable, "scripts/decode_profile.py", "--variants", "baseline;fuse",
           "--steps", "2", "--out", str(out), "model.scale=tiny", "workload.batch_size=3",
           "kernels.add_rms_norm=cpp", "kernels.rotary=cpp"]  # fmt: skip
    cache = tmp_path / "cache"  # kernel choices: not ours; the built kernels are (~6 s each)
    (cache / "llm-recipes").mkdir(parents=True)
    for lib in cache_dir().glob("*.so"):
        (cache / "llm-recipes" / lib.name).symlink_to(lib)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300, env=env)
    base, fused = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert (base["variant"], fused["variant"]) == ("baseline", "fuse")
    assert 0 < fused["kernel_calls"] < base["kernel_calls"]
    assert (
        "llm_recipes::add_rms_norm_cpp" in fused["ops"]
        and "llm_recipes::rotary_cpp" in fused["ops"]
    )
    assert all(r["step_ms"] > 0 and r["in_ops_ms"] > 0 for r in (base, fused))
    assert base["batch"] == fused["batch"] == 3  # a batched decode step: 3 rows
    md = out.with_suffix(".md").read_text()
    assert "| fuse |" in md and "batch 3," in md
