// The device error record (pykernels/runtime/device_errors.py holds the same code table
// and the messages): input checks that need device data are made by the kernels, which
// record the first error, skip the bad work and finish, so no host read breaks CUDA graphs.
#pragma once
#include <cstdint>

namespace pk {

// Same numbers and names as device_errors.CODES (a test checks they agree).
enum ErrorCode : int {
  kErrNone = 0,
  kErrMIndexOutOfRange = 1,
  kErrMaskedMOutOfRange = 2,
  kErrBlockTableOutOfRange = 3,
  kErrSeqlenOutOfRange = 4,
  kErrMetadataStale = 5,
  kErrMetadataOutOfRange = 6,
  kErrNumSplitsMismatch = 7,
  kErrMetadataMismatch = 8,
  kErrContextLensOutOfRange = 9,
  kErrWindowStartOutOfRange = 10,
  kErrWindowEndOutOfRange = 11,
  kErrSparseIndexOutOfRange = 12,
  kErrTopkLengthOutOfRange = 13,
  kErrGroupEndOutOfRange = 14,   // recorded by torch ops (device_errors.record_first), no kernel
};

constexpr int kErrorRecordWords = 8;   // code, arg0, arg1, arg2, cta.x, cta.y, cta.z, reserved

// Record `code` with its three arguments unless an error is already recorded (the first
// one wins). `record` may be null (checks off).
__device__ __forceinline__ void record_error(int* record, int code, int a0, int a1, int a2) {
  if (record == nullptr) return;
  if (atomicCAS(record, 0, code) != 0) return;
  record[1] = a0;
  record[2] = a1;
  record[3] = a2;
  record[4] = static_cast<int>(blockIdx.x);
  record[5] = static_cast<int>(blockIdx.y);
  record[6] = static_cast<int>(blockIdx.z);
}

}  // namespace pk
