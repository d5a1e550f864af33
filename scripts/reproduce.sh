#!/usr/bin/env bash
# Regenerate every committed table under results/ and paste them into the READMEs.
# Each command is a recipe run exactly as a user would type it (default: small scale,
# seeded weights, the machine's own hardware). Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
llama=recipes/llama65b/run.py

# The LLaMA recipe: what each opt adds, and transformers' generate() on the same weights.
python $llama +opt=flash_attn,int8 bench.ladder=true bench.peers=[hf]
# What the KV cache buys: recompute vs preallocated cache, 256 generated tokens.
python $llama 'bench.variants=[[no_kv_cache],[static_kv]]' workload.num_prompts=1 workload.max_new_tokens=256 bench.rounds=2
# Paged attention against the contiguous cache, same fused attention, batch 1.
python $llama 'bench.variants=[[static_kv,flash_attn],[paged_kv,flash_attn]]'
# KV memory and scheduling on mixed lengths: contiguous vs paged, int8 KV, continuous batching.
python $llama workload=throughput bench.peers=[hf] bench.rounds=2 \
  'bench.variants=[[static_kv],[static_kv,kv_int8],[paged_kv],[paged_kv,kv_int8],[paged_kv,cont_batch],[paged_kv,cont_batch,flash_attn]]'
# Prefix caching on a shared 512-token system prompt.
python $llama workload=shared_prefix 'bench.variants=[[paged_kv],[paged_kv,prefix_cache]]'
# Online serving: latency vs throughput as the arrival rate grows.
python $llama workload=online 'bench.variants=[[paged_kv],[paged_kv,cont_batch]]' \
  'bench.sweep={key: workload.rate, values: [2, 8, 32]}' workload.num_requests=24 bench.rounds=1

# The ChatGLM (GLM-4) recipe and what its 2 KV heads buy.
python recipes/chatglm/run.py +opt=flash_attn,int8 bench.ladder=true bench.peers=[hf]
python scripts/gqa_table.py

python scripts/render_tables.py
