"""The roofline's bandwidth is probed over a buffer the size of one decode step's reads
(weights + live KV), not a fixed size: a model that fits a cache reads at that cache's speed."""

from __future__ import annotations

from common.bench.cli import compose_config, rewrite_opt_args
from common.bench.orchestrate import _bandwidth
from common.bench.preflight import preflight
from common.bench.report import _read_bandwidth
from common.device.select import resolve_dtype
from common.io.checkpoint import from_seed
from common.parallel.measured import decode_weight_bytes
from common.parallel.memory import kv_bytes_per_token
from models.llama import LlamaForCausalLM


def _probe(*args: str) -> tuple:
    base = ["model.scale=tiny", "hardware=cpu", "hardware.mem_bw_gbs=null"]
    cfg = compose_config("llama65b", rewrite_opt_args([*base, *args]))
    checked = preflight(cfg, LlamaForCausalLM)
    return cfg, checked, _bandwidth(cfg, checked, LlamaForCausalLM)


def test_probe_buffer_is_one_decode_steps_reads_and_follows_the_model() -> None:
    sizes = []
    for layers in (2, 4):
        cfg, checked, (bandwidth, source, size) = _probe(
            f"model.presets.tiny.num_hidden_layers={layers}", "workload.prompt_len=40"
        )
        dtype = resolve_dtype(cfg.model.dtype, checked.device)
        model = from_seed(LlamaForCausalLM, checked.args, 0, "cpu", dtype)
        # latency workload: batch 1, each request's mean decode context = 40 + 64 / 2 tokens
        kv = (40 + 64 / 2) * kv_bytes_per_token(checked.args, dtype)
        assert size == decode_weight_bytes(model) + round(kv)
        assert bandwidth > 0
        assert f"streaming read of a {size / 1e6:.3g} MB buffer" in source
        sizes.append(size)
    assert sizes[1] > sizes[0]


def test_a_full_batch_reads_every_rows_kv() -> None:
    one = _probe("workload=throughput", "workload.batch_size=1")[2][2]
    eight = _probe("workload=throughput", "workload.batch_size=8")[2][2]
    _, checked, _ = _probe("workload=throughput")
    dtype = resolve_dtype("auto", checked.device)
    ctx = sum(len(r.prompt) + r.max_new_tokens / 2 for r in checked.requests) / len(
        checked.requests
    )
    per_row = ctx * kv_bytes_per_token(checked.args, dtype)
    assert abs((eight - one) - 7 * per_row) <= 1


def test_a_configured_bandwidth_is_not_probed_and_the_table_says_so() -> None:
    _, _, (bandwidth, source, size) = _probe("hardware.mem_bw_gbs=12.5")
    assert (bandwidth, source, size) == (12.5e9, "hardware config", 0)
    probed = {"bandwidth_gbs": 41.0, "bandwidth_buffer_bytes": 275_000_000}
    assert (
        _read_bandwidth(probed) == ", memory read 41.0 GB/s over a 275 MB buffer (one decode step)"
    )
    assert _read_bandwidth({"bandwidth_gbs": 12.5, "bandwidth_buffer_bytes": 0}) == ""
