#include "driver.h"

#include <dlfcn.h>

#include <mutex>
#include <stdexcept>

namespace pk {
namespace {

std::once_flag g_once;
DriverApi g_api;
bool g_ok = false;
std::string g_why;

template <typename F>
bool bind(void* lib, F*& slot, const char* name) {
  // cuGetProcAddress would pick versioned symbols; the plain names used here are the
  // stable ABI entry points of every driver that supports sm_90.
  slot = reinterpret_cast<F*>(dlsym(lib, name));
  if (!slot) g_why = std::string("symbol ") + name + " missing from libcuda";
  return slot != nullptr;
}

void load() {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* err = dlerror();
    g_why = std::string("cannot load the CUDA driver (libcuda.so.1): ") + (err ? err : "unknown");
    return;
  }
  DriverApi a{};
  bool ok = bind(lib, a.cuInit, "cuInit") && bind(lib, a.cuGetErrorString, "cuGetErrorString") &&
            bind(lib, a.cuDeviceGetCount, "cuDeviceGetCount") &&
            bind(lib, a.cuDeviceGet, "cuDeviceGet") &&
            bind(lib, a.cuCtxGetCurrent, "cuCtxGetCurrent") &&
            bind(lib, a.cuCtxSetCurrent, "cuCtxSetCurrent") &&
            bind(lib, a.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain") &&
            bind(lib, a.cuModuleLoadData, "cuModuleLoadData") &&
            bind(lib, a.cuModuleUnload, "cuModuleUnload") &&
            bind(lib, a.cuModuleGetFunction, "cuModuleGetFunction") &&
            bind(lib, a.cuFuncSetAttribute, "cuFuncSetAttribute") &&
            bind(lib, a.cuLaunchKernelEx, "cuLaunchKernelEx") &&
            bind(lib, a.cuTensorMapEncodeTiled, "cuTensorMapEncodeTiled") &&
            bind(lib, a.cuIpcGetMemHandle, "cuIpcGetMemHandle") &&
            bind(lib, a.cuIpcOpenMemHandle, "cuIpcOpenMemHandle_v2") &&
            bind(lib, a.cuIpcCloseMemHandle, "cuIpcCloseMemHandle");
  if (!ok) return;
  // optional: left nullptr (and no error recorded) when the driver lacks it
  a.cuOccupancyMaxActiveClusters = reinterpret_cast<decltype(a.cuOccupancyMaxActiveClusters)>(
      dlsym(lib, "cuOccupancyMaxActiveClusters"));
  CUresult r = a.cuInit(0);
  if (r != CUDA_SUCCESS) {
    const char* msg = nullptr;
    a.cuGetErrorString(r, &msg);
    g_why = std::string("cuInit failed: ") + (msg ? msg : "unknown error");
    return;
  }
  g_api = a;
  g_ok = true;
}

}  // namespace

const DriverApi* try_driver(std::string* why) {
  std::call_once(g_once, load);
  if (!g_ok && why) *why = g_why;
  return g_ok ? &g_api : nullptr;
}

const DriverApi& driver() {
  std::string why;
  const DriverApi* a = try_driver(&why);
  if (!a) throw std::runtime_error("pykernels: no usable CUDA driver: " + why);
  return *a;
}

void check(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return;
  const char* msg = nullptr;
  driver().cuGetErrorString(r, &msg);
  throw std::runtime_error(std::string(what) + ": " + (msg ? msg : "unknown CUDA error") +
                           " (CUresult " + std::to_string(static_cast<int>(r)) + ")");
}

void ensure_context(int device) {
  const DriverApi& a = driver();
  int count = 0;
  check(a.cuDeviceGetCount(&count), "cuDeviceGetCount");
  if (device < 0 || device >= count)
    throw std::invalid_argument("device: expected an index in [0, " + std::to_string(count) +
                                "), got " + std::to_string(device));
  CUdevice dev;
  check(a.cuDeviceGet(&dev, device), "cuDeviceGet");
  CUcontext ctx = nullptr;
  check(a.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
  check(a.cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
}

}  // namespace pk
