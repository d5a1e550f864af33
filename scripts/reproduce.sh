#!/usr/bin/env bash
# Regenerate every committed table under results/ and paste them into the READMEs.
# Each command is a recipe run exactly as a user would type it (default: small scale,
# seeded weights, the machine's own hardware). Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
llama=recipes/llama65b/run.py

# The LLaMA recipe's default command, then what each opt adds and transformers' generate().
python $llama +opt=flash_attn,int8
python $llama +opt=flash_attn,int8 bench.ladder=true bench.peers=[hf]
# What the KV cache buys: recompute vs preallocated cache, 256 generated tokens.
python $llama 'bench.variants=[[no_kv_cache],[static_kv]]' workload.num_prompts=1 workload.max_new_tokens=256 bench.rounds=2
# Paged attention against the contiguous cache, same fused attention, batch 1.
python $llama 'bench.variants=[[static_kv,flash_attn],[paged_kv,flash_attn]]'
# KV memory on mixed lengths: contiguous max-length allocation (sized for the workload's
# longest possible request, 256 + 512 tokens) vs paged, and int8 KV in both layouts.
python $llama workload=throughput workload.num_requests=16 kv_cache.max_len=768 bench.rounds=1 \
  'bench.variants=[[static_kv],[static_kv,kv_int8],[paged_kv],[paged_kv,kv_int8]]'
# Scheduling at equal max batch (16) and attention kernel: static batches (padded, or paged
# with finished rows leaving) vs continuous batching, and transformers' generate().
# 64 requests per pass; no warm-up pass (each pass is ~20-140 s, and one-time costs are small).
python $llama workload=throughput bench.peers=[hf] bench.rounds=2 bench.warmup=0 \
  'bench.variants=[[static_kv,flash_attn],[paged_kv,flash_attn],[paged_kv,cont_batch,flash_attn]]'
# Batch invariance: every request is also run alone through the same variant, in fp32 (so
# batch composition cannot change rounding); `same as alone` is the share that match.
python $llama workload=throughput workload.num_requests=16 model.dtype=float32 bench.check_alone=true \
  bench.rounds=1 bench.warmup=0 'bench.variants=[[paged_kv,cont_batch,flash_attn]]'
# Prefix caching on a shared 512-token system prompt.
python $llama workload=shared_prefix 'bench.variants=[[paged_kv],[paged_kv,prefix_cache]]'
# Online serving: latency vs throughput as the arrival rate grows, from well below saturation
# to past it. At 32 req/s (every request queued at once) this machine served 0.92 (baseline)
# to 1.48 (continuous batching) req/s of this workload (req/s column of the sweep at 2/8/32
# req/s committed before, all past saturation): 0.25 and 0.5 are below, 1 and 2 across, 4 past.
python $llama workload=online 'bench.variants=[[paged_kv,flash_attn],[paged_kv,cont_batch,flash_attn]]' \
  'bench.sweep={key: workload.rate, values: [0.25, 0.5, 1, 2, 4]}' workload.num_requests=24 bench.rounds=1

# The ChatGLM (GLM-4) recipe and what its 2 KV heads buy.
python recipes/chatglm/run.py +opt=flash_attn,int8 bench.ladder=true bench.peers=[hf]
python scripts/gqa_table.py
# The decode step's matmuls alone, per int8 kernel (what the dispatch table chooses between).
python scripts/int8_kernel_table.py
# Prefill attention alone, eager vs fused, 512-4096 tokens: time and extra memory.
python scripts/attention_prefill_table.py
# Why greedy agreement is low on random weights: rounding alone flips near-tied logits.
python scripts/fidelity_floor.py
# Fidelity on a trained model: the small preset trained briefly on Python's stdlib source
# (offline, ~20 min), then the default opts and the same floor pairs on it, with held-out
# prompts; trigram repeats are banned so greedy text does not fall into loops.
ckpt=$HOME/.cache/llm-recipes/llama-small-stdlib
python scripts/train_small_lm.py --steps 200
python $llama +opt=flash_attn,int8 model.path="$ckpt" workload=file workload.path="$ckpt/prompts.jsonl" \
  workload.ignore_eos=true generation.no_repeat_ngram_size=3
python scripts/fidelity_floor.py --model-path "$ckpt" --no-repeat-ngram-size 3

# Quantization (docs/quantization.md): every weight scheme against bf16 in one table per
# model. Rows may carry their own settings ('quant.group_size=32', act-order, the LM head
# kept in float); add [w8a8] rows here
# once SmoothQuant lands. On SmolLM2-135M-Instruct (real weights, chat prompts rendered with
# its chat template): bytes, decode tok/s, TTFT, perplexity on held-out text, agreement.
quant_rows="[[int8],[int4],[int4,'quant.group_size=32'],[gptq],[gptq,'quant.act_order=true'],[awq],[awq,'quant.skip=[lm_head]'],[int8,kv_int8],[int4,kv_int8]]"
smol=$HOME/.cache/llm-recipes/SmolLM2-135M-Instruct
python scripts/get_checkpoint.py smollm2-135m-instruct
python $llama model.path="$smol" model.dtype=bfloat16 workload=chat "bench.variants=$quant_rows" bench.rounds=2
# The same rows on the seeded small preset (speed at LLaMA-65B's shape ratios).
python $llama model.dtype=bfloat16 "bench.variants=$quant_rows"
# Which modules int4 hurts most on the real model (suggests quant.skip).
python scripts/quant_sensitivity.py --model-path "$smol" --scheme int4

# Which opt was measured on which device and dtype, read from the tables above.
python scripts/support_matrix.py
python scripts/render_tables.py
