"""Result reports: the environment they record and how a sweep is described and plotted."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from common.bench.report import describe_workload, git_revision, markdown, plot_sweep
from common.device.probe import _kib, cpu_info


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_git_revision_ignores_results_only(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_revision(tmp_path)
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "results" / "t.md").write_text("regenerated\n")
    (tmp_path / "results" / "new.json").write_text("{}\n")
    assert git_revision(tmp_path) == clean  # rewriting results does not dirty the tree
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_revision(tmp_path) == clean + "+dirty"


def test_git_revision_outside_a_repository(tmp_path: Path) -> None:
    assert git_revision(tmp_path) is None


def test_cpu_info_names_the_model() -> None:
    info = cpu_info()
    assert info and "\n" not in info


@pytest.mark.parametrize(
    ("size", "text"), [("32K", "32 KiB"), ("1024K", "1 MiB"), ("32768K", "32 MiB"), ("1M", "1 MiB"), ("1536K", "1536 KiB")]
)  # fmt: skip
def test_cache_sizes_in_binary_units(size: str, text: str) -> None:
    assert _kib(size) == text


def _sweep_result() -> dict:
    workload = {"kind": "online", "num_requests": 4, "rate": 4.0, "prompt_len": [8, 16],
                "max_new_tokens": [2, 4], "batch_size": 2, "ignore_eos": True,
                "slo_ttft_ms": 1000, "slo_tpot_ms": 100}  # fmt: skip
    variants = []
    for rate in (0.5, 2):
        for name in ("baseline", "paged_kv+cont_batch"):
            metrics = {"tokens_per_s": 10 * rate, "ttft_p90_ms": 900 * rate,
                       "tpot_p90_ms": 50 * rate, "goodput_rps": rate / 2}  # fmt: skip
            variants.append({"name": f"{name} @ rate={rate}", "opts": [], "metrics": metrics,
                             "fidelity": {}, "spread": {}})  # fmt: skip
    return {
        "recipe": "llama65b",
        "hardware": "cpu",
        "command": "python recipes/llama65b/run.py ...",
        "env": {
            "device": "cpu (AVX2, 2 threads)",
            "cpu": "Some CPU (L1d 32 KiB, L3 8 MiB)",
            "torch": "2",
            "transformers": "5",
            "date": "today",
            "git_revision": "abc",
        },  # fmt: skip
        "model": "m",
        "rows": [v["name"] for v in variants],
        "workload": workload,
        "workload_desc": "online: ... Poisson arrivals at 4.0 req/s ...",
        "bench": {"rounds": 1, "warmup": 0, "repeats": 1},
        "speedup_of": "output tok/s",
        "bandwidth_gbs": 10.0,
        "bandwidth_source": "hardware config",
        "wall_s": 3.0,
        "sweep": {"key": "workload.rate", "values": [0.5, 2]},
        "variants": variants,
    }


def test_swept_rate_is_described_by_its_values_not_the_config_default() -> None:
    desc = describe_workload(_sweep_result())
    assert "Poisson arrivals at 0.5 or 2 (swept) req/s" in desc
    assert "4.0" not in desc


def test_markdown_names_cpu_and_swept_rates() -> None:
    text = markdown(_sweep_result())
    assert "(cpu) on Some CPU (L1d 32 KiB, L3 8 MiB), torch" in text
    assert "0.5 or 2 (swept)" in text


def test_plot_sweep_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "sweep.png"
    plot_sweep(_sweep_result(), path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_markdown_warns_about_truncated_requests_and_lists_kernels() -> None:
    result = _sweep_result()
    result["variants"][1]["metrics"]["truncated"] = 2
    result["variants"][1]["kernels"] = {"int8_linear[cpu,bfloat16,rows=1,bytes<=16M]": "cpp_matvec"}
    text = markdown(result)
    assert "max positions before max_new_tokens: paged_kv+cont_batch @ rate=0.5 2" in text
    assert "  - paged_kv+cont_batch @ rate=0.5: int8_linear cpp_matvec\n" in text
    assert "warning" not in markdown(_sweep_result())
