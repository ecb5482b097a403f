// pk/sparse_checks.cuh — the sparse MLA kernels' slot rule (docs/dsa.md "Checks"), written once
// for the sparse decode (csrc/mla/decode.cu, csrc/mla/decode_narrow.cu) and the sparse prefill
// (decode.cu): query token t of sequence b uses its slots below topk_length[b] whose index names
// a token row of the cache; those rows alone are read. Bad values are recorded in the device
// error record (pk/error_record.cuh) and made harmless, never read.
#pragma once

#include <cstdint>

#include "pk/error_record.cuh"

namespace pk {

// The number of sequence b's used slots: topk_length[b] (topk when topk_length is null); one
// outside [0, topk] is recorded by `leader` (TopkLengthOutOfRange: length, topk, b) and clamped.
__device__ __forceinline__ uint32_t sparse_slot_limit(const int* topk_length, uint32_t b, uint32_t topk, int* err,
                                                      bool leader) {
  const int len = topk_length != nullptr ? __ldg(topk_length + b) : (int)topk;
  if (leader) {   // nested, not one predicate: that form costs decode.cu's 72-register producer a spill
    if (len < 0 || (uint32_t)len > topk) record_error(err, kErrTopkLengthOutOfRange, len, (int)topk, (int)b);
  }
  return min((uint32_t)max(len, 0), topk);
}

// Whether index `idx` names a token row of the cache ([0, num_tokens)).
__device__ __forceinline__ bool sparse_index_in_range(int idx, uint32_t num_tokens) {
  return idx >= 0 && (uint32_t)idx < num_tokens;
}

// The decode's rule for a slot below the limit (-1 at or past it): its row is read when the
// index is in range; -1 is an unused slot; any other index is recorded (SparseIndexOutOfRange:
// index, num_tokens, the slot's flat index in [b, s_q, topk], tok() its query token: called only
// then, so its arithmetic stays off the producer's registers) and its row skipped. The sparse
// prefill takes FlashMLA's rule instead (an index out of range is an unused slot, not an error:
// sparse_index_in_range alone).
template <typename TokenOf>
__device__ __forceinline__ bool sparse_index_used(int idx, uint32_t num_tokens, int* err, uint32_t b, uint32_t s_q,
                                                  TokenOf tok, uint32_t topk, uint32_t slot) {
  const bool used = sparse_index_in_range(idx, num_tokens);
  if (__builtin_expect((uint32_t)idx + 1u > num_tokens, 0))   // neither -1 nor in range (num_tokens < 2^31)
    record_error(err, kErrSparseIndexOutOfRange, idx, (int)num_tokens,
                 (int)(((uint64_t)b * s_q + tok()) * topk + slot));
  return used;
}

}  // namespace pk
