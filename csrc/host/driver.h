// Lazily loaded CUDA driver API.
//
// pykernels._C must import on machines with no GPU and no driver, so nothing here links
// against libcuda: the library is dlopen'ed on first use and each entry point is looked
// up by name. cuda.h is included for its types only.
#pragma once
#include <cuda.h>

#include <string>

namespace pk {

struct DriverApi {
  CUresult (*cuInit)(unsigned int);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  CUresult (*cuDeviceGetCount)(int*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleUnload)(CUmodule);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuFuncSetAttribute)(CUfunction, CUfunction_attribute, int);
  CUresult (*cuLaunchKernelEx)(const CUlaunchConfig*, CUfunction, void**, void**);
  CUresult (*cuTensorMapEncodeTiled)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                     const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                     const cuuint32_t*, CUtensorMapInterleave,
                                     CUtensorMapSwizzle, CUtensorMapL2promotion,
                                     CUtensorMapFloatOOBfill);
  CUresult (*cuIpcGetMemHandle)(CUipcMemHandle*, CUdeviceptr);
  CUresult (*cuIpcOpenMemHandle)(CUdeviceptr*, CUipcMemHandle, unsigned int);
  CUresult (*cuIpcCloseMemHandle)(CUdeviceptr);
  // Optional (nullptr when the driver lacks it): clustered-occupancy query, CUDA 12.0+.
  CUresult (*cuOccupancyMaxActiveClusters)(int*, CUfunction, const CUlaunchConfig*);
};

// Loads the driver once; returns nullptr (and sets *why) when it cannot.
const DriverApi* try_driver(std::string* why);

// Like try_driver but throws std::runtime_error naming the cause.
const DriverApi& driver();

// Throws std::runtime_error("<what>: <driver message>") unless r == CUDA_SUCCESS.
void check(CUresult r, const char* what);

// Makes the primary context of `device` current on this thread (as the CUDA runtime
// and torch do), initialising the driver on first use.
void ensure_context(int device);

}  // namespace pk
