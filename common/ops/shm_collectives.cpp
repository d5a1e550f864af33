// All-reduce and all-gather for the CPU ranks of one node through a shared-memory segment
// (common/parallel/collectives.py), the way vLLM's and DeepSpeed's CPU backends do it. A decode
// step's messages are a few KB; gloo's TCP pairs wake a sleeping thread for each one, and on
// a VM a wake-up can take hundreds of microseconds, while a rank that owns its core can spin.
//
// Segment: one sequence number per rank (own cache line), then two buffers of `world` slots.
// Call `seq` writes its data to slot `rank` of buffer seq % 2, publishes seq, and waits until
// every rank has published seq; then it reads all slots. A rank can only start call seq + 2,
// which writes the same buffer again, after seeing every rank publish seq + 1, i.e. after
// every rank finished reading call seq: two buffers suffice.
#include <immintrin.h>
#include <sched.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#include "convert.h"

namespace {
constexpr int64_t LINE = 64;

std::atomic<int64_t>* flag(char* base, int r) {
  return reinterpret_cast<std::atomic<int64_t>*>(base + r * LINE);
}

char* slot(char* base, int world, int64_t slot_bytes, int64_t seq, int r) {
  return base + world * LINE + ((seq & 1) * world + r) * slot_bytes;
}

// Spin (the rank owns its core), yielding now and then in case it does not.
void wait_all(char* base, int world, int64_t seq) {
  for (int r = 0; r < world; ++r)
    for (int64_t spins = 0; flag(base, r)->load(std::memory_order_acquire) < seq; ++spins) {
      _mm_pause();
      if ((spins & 1023) == 1023) sched_yield();
    }
}

void publish(char* base, int rank, int world, int64_t slot_bytes, int64_t seq, const void* data,
             int64_t nbytes) {
  std::memcpy(slot(base, world, slot_bytes, seq, rank), data, nbytes);
  flag(base, rank)->store(seq, std::memory_order_release);
  wait_all(base, world, seq);
}

// out = sum of every rank's slot in rank order, accumulated in fp32: every rank computes the
// same sums in the same order, so all ranks hold bit-identical results.
template <class T>
void reduce(char* base, int world, int64_t slot_bytes, int64_t seq, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float acc = 0.f;
    for (int r = 0; r < world; ++r)
      acc += to_f32(reinterpret_cast<const T*>(slot(base, world, slot_bytes, seq, r))[i]);
    store(acc, out + i);
  }
}
}  // namespace

extern "C" int64_t shm_segment_bytes(int world, int64_t slot_bytes) {
  return world * LINE + 2 * world * slot_bytes;
}

// data [n] (dtype 0: fp32, 1: bf16) summed over the ranks, in place.
extern "C" void shm_all_reduce(void* base, int rank, int world, int64_t slot_bytes, int64_t seq,
                               void* data, int64_t n, int dtype) {
  auto* b = static_cast<char*>(base);
  publish(b, rank, world, slot_bytes, seq, data, n * (dtype ? 2 : 4));
  if (dtype)
    reduce(b, world, slot_bytes, seq, static_cast<uint16_t*>(data), n);
  else
    reduce(b, world, slot_bytes, seq, static_cast<float*>(data), n);
}

// data [nbytes] from every rank -> out [world * nbytes], in rank order.
extern "C" void shm_all_gather(void* base, int rank, int world, int64_t slot_bytes, int64_t seq,
                               const void* data, void* out, int64_t nbytes) {
  auto* b = static_cast<char*>(base);
  publish(b, rank, world, slot_bytes, seq, data, nbytes);
  for (int r = 0; r < world; ++r)
    std::memcpy(static_cast<char*>(out) + r * nbytes, slot(b, world, slot_bytes, seq, r), nbytes);
}
