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

# The engines users would pick instead (docs/peers.md; install once with
# scripts/install_peers.sh llama_cpp and scripts/install_peers.sh vllm): batch-1 latency with
# transformers and llama.cpp (bf16 and q8_0, matching the ladder's int8 row), and the
# throughput workload at max batch 16 against vLLM; then the same on the real SmolLM2 weights.
python $llama +opt=flash_attn,int8 bench.ladder=true bench.peers=[hf,llama_cpp]
python $llama workload=throughput bench.peers=[vllm] bench.rounds=2 bench.warmup=1 \
  'bench.variants=[[paged_kv,cont_batch,flash_attn],[paged_kv,cont_batch,flash_attn,int8],[paged_kv,cont_batch,flash_attn,fuse,fast_linear],[paged_kv,cont_batch,flash_attn,fuse,fast_linear,compile],[paged_kv,cont_batch,flash_attn,int8,fuse,compile],[paged_kv,cont_batch,flash_attn,w8a8,fuse,compile]]'
# fuse, fast_linear and compile (each compiled row next to the same opts eager) against
# llama.cpp's bf16 and q8_0, batch 1; then their fidelity on the real SmolLM2 weights.
python $llama bench.peers=[llama_cpp] bench.rounds=3 \
  'bench.variants=[[fuse],[fuse,compile],[fuse,fast_linear],[fuse,fast_linear,compile],[flash_attn,int8,fuse],[flash_attn,int8,fuse,compile],[flash_attn,w8a8,fuse],[flash_attn,w8a8,fuse,compile]]'
smollm2=$HOME/.cache/llm-recipes/SmolLM2-135M-Instruct
python scripts/get_checkpoint.py smollm2-135m-instruct
python $llama model.path="$smollm2" workload=chat bench.rounds=1 bench.results_dir=results/smollm2-135m \
  'bench.variants=[[fuse],[fuse,fast_linear],[fuse,compile],[fuse,fast_linear,compile],[flash_attn,int8,fuse,compile],[flash_attn,w8a8,fuse,compile]]'
python $llama +opt=flash_attn,int8 bench.ladder=true bench.peers=[hf,llama_cpp] model.path="$smollm2" \
  bench.results_dir=results/smollm2-135m
python $llama workload=throughput bench.peers=[vllm] bench.rounds=2 bench.warmup=0 model.path="$smollm2" \
  'bench.variants=[[paged_kv,cont_batch,flash_attn],[paged_kv,cont_batch,flash_attn,int8]]' \
  bench.results_dir=results/smollm2-135m

# The ChatGLM (GLM-4) recipe and what its 2 KV heads buy.
python recipes/chatglm/run.py +opt=flash_attn,int8 bench.ladder=true bench.peers=[hf]
python scripts/gqa_table.py
# The decode step's matmuls alone at 1-16 rows, per linear kernel (bf16, weight-only int8,
# int8 x int8): what the dispatch table chooses between.
python scripts/linear_kernel_table.py
# Batched decode with int8 weights: continuous batching, bf16 vs weight-only int8 vs w8a8
# (int8 should be no slower than bf16 here; 64 requests per pass).
python $llama workload=throughput bench.rounds=2 bench.warmup=0 \
  'bench.variants=[[paged_kv,cont_batch,flash_attn],[paged_kv,cont_batch,flash_attn,int8],[paged_kv,cont_batch,flash_attn,w8a8]]'
# W8A8 on real weights (SmolLM2-135M-Instruct), with and without smoothing, vs bf16 and int8.
smol=$HOME/.cache/llm-recipes/SmolLM2-135M-Instruct
python $llama model.path="$smol" 'bench.variants=[[flash_attn,int8],[flash_attn,w8a8]]'
python $llama model.path="$smol" quant.smooth=false 'bench.variants=[[flash_attn,w8a8]]'
# Quantize once, load many times: the saved w8a8 checkpoint runs without the float weights.
rm -rf "$smol-w8a8"
python scripts/quantize.py +opt=w8a8 model.path="$smol" quant.save="$smol-w8a8"
python $llama +opt=flash_attn,w8a8 model.path="$smol-w8a8"
# Prefill attention alone, eager vs fused, 512-4096 tokens: time and extra memory.
python scripts/attention_prefill_table.py
# Why greedy agreement is low on random weights: rounding alone flips near-tied logits.
python scripts/fidelity_floor.py
# Fidelity on a trained model: the default opts and the same floor pairs on the real
# SmolLM2-135M-Instruct and its chat prompts, whose peaked logits do not flip under rounding.
python $llama +opt=flash_attn,int8 model.path="$smollm2" workload=chat bench.results_dir=results/smollm2-135m
python scripts/fidelity_floor.py --model-path "$smollm2" --workload chat

# The Qwen-VL recipe on the `vl` workload (12 requests of one 560x560 image, 400 tokens, + 32 text tokens,
# each image one seen before with probability 0.5): the vision-feature cache and prefix
# caching on repeated images, and int8 + fused attention on the language half, for Qwen2-VL
# and Qwen2.5-VL; then overlapped vision encoding under continuous batching (all requests
# queued at once: compare output tok/s with the cont_batch row).
qwen=recipes/qwen_vl/run.py
python $qwen 'bench.variants=[[vision_cache],[paged_kv,prefix_cache],[vision_cache,flash_attn,int8]]' \
  workload.num_requests=12 bench.rounds=2
python $qwen model=qwen2_5_vl 'bench.variants=[[vision_cache],[vision_cache,flash_attn,int8]]' \
  workload.num_requests=12 bench.rounds=2
python $qwen workload.batch_size=4 workload.num_requests=12 bench.rounds=2 \
  'bench.variants=[[cont_batch],[cont_batch,vision_overlap],[vision_cache,cont_batch,vision_overlap]]'

# Beyond one device (docs/parallelism.md). Tensor parallel: one process vs two ranks under
# torchrun (one thread per rank: the same two cores; collectives in shared memory), batch 1
# and batch 8; then the ranks' collectives through gloo vs shared memory.
python $llama +opt=flash_attn 'bench.sweep={key: parallel.tp, values: [1, 2]}' bench.rounds=3 bench.replace=true
python $llama +opt=flash_attn parallel.tp=2 'bench.sweep={key: parallel.shm_mb, values: [0, 16]}' \
  bench.rounds=2 bench.results_dir=results/parallel/shm
# What binding each CPU rank to its own cores does (torchrun alone leaves them roaming).
python $llama +opt=flash_attn parallel.tp=2 'bench.sweep={key: parallel.cpu_bind, values: [false, true]}' \
  bench.rounds=2 bench.results_dir=results/parallel/cpu_bind
python $llama +opt=flash_attn workload=throughput workload.num_requests=16 workload.batch_size=8 \
  'bench.sweep={key: parallel.tp, values: [1, 2]}' bench.rounds=2
# Pipeline parallel: throughput and bubble vs micro-batch count, two stages vs one device, on
# the real SmolLM2-135M (30 layers, tied head: the last stage holds its own copy of the table).
python scripts/pipeline_table.py model.path="$HOME/.cache/llm-recipes/SmolLM2-135M-Instruct"
# Offload: decoder layers streamed from host memory, from a file (page cache warm), and from
# the file dropped from the page cache before every forward, vs the model in memory.
python $llama 'bench.variants=[[offload_cpu],[offload_disk],[offload_disk,offload_cold]]'
# ... and on paper for LLaMA-65B on one 64 GiB accelerator.
python scripts/offload_table.py

# Planning (docs/planning.md): memory per device of the three full-size models (arithmetic,
# seconds), the planner's top strategies for LLaMA-65B on the two accelerator nodes
# (arithmetic, seconds), and its predictions against measured recipe runs on this machine
# (TP 1-2 x PP 1-2 x batch 1/4/16 plus three narrowed runs: ~15-25 min).
for model in llama65b glm4_9b qwen2_vl_7b; do python scripts/plan.py memory --model $model; done
for hw in ascend910b_x8 a100_80g_x8; do
  python scripts/plan.py strategy --model llama65b --hardware $hw --ttft-slo-ms 2000 --tpot-slo-ms 50
done
python scripts/plan_validate.py

# Speed against the engines users would pick instead (docs/performance.md), small scale, batch 1.
# Where the decode step's time goes: kernel calls per step, step time and tok/s, time inside
# vs outside ops, and the per-op breakdown, unfused / fused / compiled (~10 min).
python scripts/decode_profile.py model.scale=small
# The same for the int4 family: int4 (torch's int4 kernel, bf16 activations) against w4a8
# (our VNNI kernel, int8 activations), eager and compiled.
python scripts/decode_profile.py --variants "int4;w4a8;flash_attn,int4,fuse,compile;flash_attn,w4a8,fuse,compile" \
  --out results/llama65b/cpu/decode_profile_int4 model.scale=small
# The issue's numbers, every row in one run, with the llama.cpp peer (bf16 against the bf16
# rows, q8_0 against the int8 ones): fuse, our own bf16 kernel (fast_linear), compile, and
# weight-only vs activation-quantized int8; compile time has its own column (~10 min).
python $llama bench.peers=[llama_cpp] bench.rounds=2 \
  'bench.variants=[[fuse],[fuse,fast_linear],[fuse,compile],[fuse,fast_linear,compile],[flash_attn,int8,fuse,compile],[flash_attn,w8a8,fuse,compile]]'
# What inductor's C++ wrapper and freezing (weights as constants) do to the compiled step.
python $llama +opt=fuse,fast_linear,compile bench.rounds=2 'bench.sweep={key: compile.cpp_wrapper, values: [false, true]}'
python $llama +opt=fuse,fast_linear,compile bench.rounds=2 'bench.sweep={key: compile.freezing, values: [false, true]}'
# A compiled step's batch-1 bf16 matmuls as oneDNN's GEMV or as inductor's own reductions.
python $llama +opt=fuse,compile bench.rounds=3 'bench.sweep={key: kernels.compiled_gemv, values: [aten, inductor]}'
# The compiled step under continuous batching on paged KV (64 requests, max batch 16: one graph
# padded to 16 rows), bf16 and int8 (~15 min).
python $llama workload=throughput bench.rounds=2 'bench.variants=[[paged_kv,cont_batch,flash_attn],[paged_kv,cont_batch,flash_attn,fuse,compile],[paged_kv,cont_batch,flash_attn,int8,fuse,compile]]'
# Token agreement of each optimized row with the baseline on real weights (SmolLM2-135M-Instruct).
python $llama model.path="$HOME/.cache/llm-recipes/SmolLM2-135M-Instruct" bench.rounds=1 \
  'bench.variants=[[fuse],[fuse,compile],[flash_attn,int8],[flash_attn,int8,fuse,compile]]'

# Decoding strategies (docs/decoding.md). Prompt files: repeat a passage (copy-heavy) and
# open-ended stories (free generation), chat-formatted for SmolLM2, token ids for the preset.
sm=$HOME/.cache/llm-recipes/SmolLM2-135M-Instruct
draft=$HOME/.cache/llm-recipes/SmolLM2-draft
wl=results/workloads
python scripts/spec_workloads.py --tokenizer "$sm" --out $wl/smollm2
python scripts/spec_workloads.py --vocab 32000 --out $wl/small
# A 2-layer drafter with SmolLM2's tokenizer, distilled from it on built-in text (~15 min).
python scripts/train_draft.py --teacher "$sm" --out "$draft"
# One row without speculation, then speculation at k = 2, 4, 8 (rows carry their own spec.k,
# so the rows that do not speculate run once, not once per k); 2 rounds each.
spec_rows="bench.variants=[[static_kv,flash_attn],[static_kv,flash_attn,spec_decode,'spec.k=2'],[static_kv,flash_attn,spec_decode,'spec.k=4'],[static_kv,flash_attn,spec_decode,'spec.k=8']]"
rounds=bench.rounds=2
for kind in copy free; do
  # (a) greedy speculative decoding vs k, per drafter: acceptance, tokens per verification,
  # TPOT and decode tok/s against the same opts without speculation.
  python $llama model.path="$sm" workload=file workload.path=$wl/smollm2/$kind.jsonl "$spec_rows" $rounds \
    spec.method=ngram bench.results_dir=results/decoding/smollm2-$kind-ngram
  python $llama model.path="$sm" workload=file workload.path=$wl/smollm2/$kind.jsonl "$spec_rows" $rounds \
    spec.method=draft spec.draft.path="$draft" bench.results_dir=results/decoding/smollm2-$kind-draft
  # One round on the seeded preset: its rows show cost at LLaMA-65B's shape ratios.
  python $llama workload=file workload.path=$wl/small/$kind.jsonl workload.ignore_eos=true "$spec_rows" bench.rounds=1 \
    spec.method=ngram bench.results_dir=results/decoding/small-$kind-ngram
done
# The seeded tiny preset as drafter of the seeded small one: random weights on both sides, so
# this shows a drafter's cost when its drafts are rejected, on copy and on free generation.
python $llama workload=file workload.path=$wl/small/copy.jsonl workload.ignore_eos=true "$spec_rows" bench.rounds=1 \
  spec.method=draft spec.draft.scale=tiny bench.results_dir=results/decoding/small-copy-draft
python $llama workload=file workload.path=$wl/small/free.jsonl workload.ignore_eos=true "$spec_rows" bench.rounds=1 \
  spec.method=draft spec.draft.scale=tiny bench.results_dir=results/decoding/small-free-draft
# bf16 rounds a (k + 1)-token verification differently from a 1-token step, so a near tie can
# flip a greedy token; in fp32 the speculative row's tokens are the non-speculative ones.
python $llama model.path="$sm" model.dtype=float32 workload=file workload.path=$wl/smollm2/copy.jsonl \
  "bench.variants=[[static_kv,flash_attn],[static_kv,flash_attn,spec_decode,'spec.k=8']]" bench.rounds=1 \
  spec.method=ngram bench.results_dir=results/decoding/smollm2-copy-ngram-fp32
# Where speculation hurts: 32 requests under continuous batching at batch 16 (a verification
# costs k + 1 tokens of compute per sequence once the batch is compute-bound), and the same
# with speculation switched off above 4 running sequences (spec.max_batch).
python $llama model.path="$sm" workload=throughput workload.num_requests=32 workload.batch_size=16 \
  workload.prompt_len=[64,256] workload.max_new_tokens=[32,128] spec.k=4 bench.rounds=1 \
  'bench.variants=[[paged_kv,cont_batch,flash_attn],[paged_kv,cont_batch,flash_attn,spec_decode]]' \
  bench.results_dir=results/decoding/smollm2-load-ngram
python $llama model.path="$sm" workload=throughput workload.num_requests=32 workload.batch_size=16 \
  workload.prompt_len=[64,256] workload.max_new_tokens=[32,128] spec.k=4 spec.max_batch=4 bench.rounds=1 \
  'bench.variants=[[paged_kv,cont_batch,flash_attn],[paged_kv,cont_batch,flash_attn,spec_decode]]' \
  bench.results_dir=results/decoding/smollm2-load-ngram-max4
# ... and with the distilled drafter: k forwards of its own per verification, at low acceptance.
python $llama model.path="$sm" workload=throughput workload.num_requests=32 workload.batch_size=16 \
  workload.prompt_len=[64,256] workload.max_new_tokens=[32,128] spec.k=4 bench.rounds=1 \
  'bench.variants=[[paged_kv,cont_batch,flash_attn],[paged_kv,cont_batch,flash_attn,spec_decode]]' \
  spec.method=draft spec.draft.path="$draft" bench.results_dir=results/decoding/smollm2-load-draft
# (b) beam search: tok/s and KV bytes for 1/2/4 beams, paged (beams fork and share the
# prompt's blocks) vs contiguous rows (every beam a full copy).
python $llama model.path="$sm" workload=file workload.path=$wl/smollm2/free.jsonl workload.max_new_tokens=64 \
  'bench.variants=[[static_kv,flash_attn],[paged_kv,flash_attn]]' 'bench.sweep={key: generation.num_beams, values: [1, 2, 4]}' \
  bench.rounds=1 bench.results_dir=results/decoding/smollm2-beams
# (c) each logits processor's cost per step at batch 1 and 16, and agreement with transformers'.
python scripts/sampling_table.py

# Quantization (docs/quantization.md): every weight scheme against bf16 in one table per
# model. Rows carry their own settings (group 32, clipping or act-order off, GPTQ int8, the
# tied LM head or the most sensitive layers kept in float, SmoothQuant without smoothing). On
# SmolLM2-135M-Instruct (real weights, the chat prompts rendered with its chat template, 32
# new tokens): bytes, decode tok/s, TTFT, perplexity on held-out text, agreement. One round
# (every row quantizes and calibrates in its own process, ~40 min): the quality columns are
# deterministic, speed comes from the preset table below.
smol_rows="[[int8],[int8,'quant.skip=[lm_head]'],[gptq,'quant.bits=8'],[int4],[int4,'quant.group_size=32'],[w4a8],[gptq],[gptq,'quant.skip=[lm_head]'],[gptq,'quant.skip=[lm_head]','quant.clip=false'],[gptq,'quant.skip=[lm_head]','quant.act_order=false'],[gptq,'quant.skip=[lm_head,layers.11.mlp,layers.29.mlp]'],[awq],[awq,'quant.skip=[lm_head]'],[w8a8],[w8a8,'quant.smooth=false'],[int8,kv_int8],[int4,kv_int8]]"
smol=$HOME/.cache/llm-recipes/SmolLM2-135M-Instruct
python scripts/get_checkpoint.py smollm2-135m-instruct
python $llama model.path="$smol" workload=chat workload.max_new_tokens=32 "bench.variants=$smol_rows" \
  bench.rounds=1 bench.warmup=0 bench.results_dir=results/quant/smollm2
# The scheme rows on the seeded small preset, batch 1, two rounds (speed at LLaMA-65B's shape
# ratios; perplexity needs real weights).
quant_rows="[[int8],[int4],[int4,'quant.group_size=32'],[gptq],[awq],[awq,'quant.skip=[lm_head]'],[w8a8],[w8a8,'quant.smooth=false'],[int8,kv_int8],[int4,kv_int8]]"
python $llama "bench.variants=$quant_rows" bench.rounds=2 bench.results_dir=results/quant/small
# int4 at group 128 and 32 (and compiled), and w4a8 (int8 activations, q4_0's product), against
# llama.cpp's q4_0 on the same seeded weights.
python $llama bench.peers=[llama_cpp] bench.rounds=3 "bench.variants=[[int4],[int4,'quant.group_size=32'],[flash_attn,int4,fuse,compile],[w4a8],[flash_attn,w4a8,fuse,compile]]"
# Which modules int4 hurts most on the real model (suggests quant.skip).
python scripts/quant_sensitivity.py --model-path "$smol" --scheme int4
# How much of a perplexity change is which way each weight rounded: the same errors, shuffled.
python scripts/perplexity_floor.py --model-path "$smol" --scheme int8
python scripts/perplexity_floor.py --model-path "$smol" --scheme int8 --group-size 128
python scripts/perplexity_floor.py --model-path "$smol" --scheme int4
# Group-wise int8 (quant.group_size): quality on SmolLM2 (one round), speed on the small preset.
python $llama model.path="$smol" workload=chat workload.max_new_tokens=32 \
  "bench.variants=[[int8],[int8,'quant.group_size=128'],[int8,'quant.group_size=64'],[int8,'quant.group_size=32'],[int8,kv_int8,'quant.group_size=128']]" \
  bench.rounds=1 bench.warmup=0 bench.results_dir=results/quant/smollm2
python $llama "bench.variants=[[int8],[int8,'quant.group_size=128'],[int8,'quant.group_size=32'],[flash_attn,int8,fuse,compile],[flash_attn,int8,fuse,compile,'quant.group_size=128']]" \
  bench.rounds=3 bench.results_dir=results/quant/small

# Which opt was measured on which device and dtype, read from the tables above.
python scripts/support_matrix.py
python scripts/render_tables.py
