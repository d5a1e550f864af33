// What the kernel sources that define torch ops share (loaded by common/ops/library.py): torch's
// headers for Tensor, empty and the op registry, and argument checks that raise ValueError in
// Python, as the fake implementations next to each op in the .py files do. An op called from
// Python or from compiled code reaches the kernel through the dispatcher alone (~1.5 us), with
// no Python in between.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#define CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace op {
inline bool float_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

// f(T{}) with T the raw element type of x's dtype: float, or uint16_t for bfloat16 (convert.h).
template <class F>
decltype(auto) by_dtype(const at::Tensor& x, F&& f) {
  CHECK_ARG(float_or_bf16(x), "expected float32 or bfloat16, got ", x.scalar_type());
  return x.scalar_type() == at::kBFloat16 ? f(uint16_t{}) : f(float{});
}

template <class T>
const T* in(const at::Tensor& t) { return static_cast<const T*>(t.data_ptr()); }
template <class T>
T* out(const at::Tensor& t) { return static_cast<T*>(t.data_ptr()); }
template <class T>
const T* in(const std::optional<at::Tensor>& t) { return t ? in<T>(*t) : nullptr; }

inline int threads() { return at::get_num_threads(); }

// y [M, N] for x [M, K] (float32/bfloat16 on cpu) and a contiguous weight [N, K] of dtype
// `weight_dtype`, with a per-channel vector [N] (scales, a bias; optional) in x's dtype.
inline at::Tensor linear_out(const char* name, const at::Tensor& x, const at::Tensor& w,
                             at::ScalarType weight_dtype, const at::Tensor* per_channel) {
  const bool ok = float_or_bf16(x) && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) &&
                  w.scalar_type() == weight_dtype && w.is_contiguous() &&
                  (!per_channel || (per_channel->scalar_type() == x.scalar_type() &&
                                    per_channel->dim() == 1 && per_channel->size(0) == w.size(0)));
  CHECK_ARG(ok, name, " needs x [M, K] float32/bfloat16, a contiguous ", weight_dtype,
            " weight [N, K] and a vector [N] in x's dtype; got x ", x.sizes(), " ", x.scalar_type(),
            ", weight ", w.sizes(), " ", w.scalar_type(), ", vector ",
            per_channel ? per_channel->sizes() : at::IntArrayRef{}, " ",
            per_channel ? per_channel->scalar_type() : x.scalar_type());
  return at::empty({x.size(0), w.size(0)}, x.options());
}

// The input channels each scale of a quantized weight [N, K] covers: scales [N] (group_size
// 0: the whole row, K) or [N, ceil(K / group_size)] for a group_size that is a multiple of 32
// (the vector kernels' step, so only the last group of a row is ever partial), in x's dtype.
inline int64_t scale_group(const char* name, const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& scales, int64_t group_size) {
  const int64_t N = w.size(0), K = w.size(1);
  const bool ok =
      scales.scalar_type() == x.scalar_type() &&
      (group_size == 0 ? scales.dim() == 1 && scales.size(0) == N
                       : group_size > 0 && group_size % 32 == 0 && scales.dim() == 2 &&
                             scales.size(0) == N && scales.size(1) == (K + group_size - 1) / group_size);
  CHECK_ARG(ok, name, " needs scales in x's dtype, [N] for group_size 0 or [N, ceil(K / g)] for ",
            "group_size g (a multiple of 32); got scales ", scales.sizes(), " ", scales.scalar_type(),
            " for a weight ", w.sizes(), ", group_size ", group_size);
  return group_size == 0 ? std::max<int64_t>(K, 1) : group_size;
}
}  // namespace op
