// Element types as raw C types (bf16 is uint16_t), loaded as fp32 with to_f32 and written back
// with store (bf16 rounds to nearest even). Shared by every kernel in this directory.
#pragma once
#include <cstdint>
#include <cstring>
static inline float to_f32(float x) { return x; }
static inline float to_f32(uint16_t x) { uint32_t u = uint32_t(x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline void store(float f, float* d) { *d = f; }
static inline void store(float f, uint16_t* d) {
  uint32_t u; std::memcpy(&u, &f, 4); *d = uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
