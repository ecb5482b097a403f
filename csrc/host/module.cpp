// pykernels._C: host-side glue between the Python launch plans and the CUDA driver.
//
// Host code only. Every entry point that needs the GPU loads the driver on first use
// and raises a Python RuntimeError saying why when it cannot (no driver, no device).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "driver.h"

namespace py = pybind11;
using pk::check;
using pk::driver;

namespace {

using Dim3 = std::array<unsigned, 3>;

bool driver_available() { return pk::try_driver(nullptr) != nullptr; }

std::string driver_error() {
  std::string why;
  return pk::try_driver(&why) ? std::string() : why;
}

int device_count() {
  int n = 0;
  check(driver().cuDeviceGetCount(&n), "cuDeviceGetCount");
  return n;
}

// Loads a cubin image (bytes) into the primary context of `device`.
uintptr_t load_module(py::bytes image, int device) {
  pk::ensure_context(device);
  std::string data = image;  // the driver reads it during the call only
  CUmodule mod = nullptr;
  check(driver().cuModuleLoadData(&mod, data.data()), "cuModuleLoadData");
  return reinterpret_cast<uintptr_t>(mod);
}

uintptr_t get_function(uintptr_t module, const std::string& name) {
  CUfunction fn = nullptr;
  check(driver().cuModuleGetFunction(&fn, reinterpret_cast<CUmodule>(module), name.c_str()),
        ("cuModuleGetFunction(" + name + ")").c_str());
  return reinterpret_cast<uintptr_t>(fn);
}

void set_max_dynamic_shared(uintptr_t function, int bytes) {
  check(driver().cuFuncSetAttribute(reinterpret_cast<CUfunction>(function),
                                    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes),
        "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");
}

// A launch configuration; a cluster of more than one CTA and programmatic dependent launch
// (pdl) go in attrs[0..1] (which must outlive the configuration).
CUlaunchConfig launch_config(Dim3 grid, Dim3 block, Dim3 cluster, unsigned shared_bytes, bool pdl,
                             CUlaunchAttribute (&attrs)[2]) {
  CUlaunchConfig cfg{};
  cfg.gridDimX = grid[0];
  cfg.gridDimY = grid[1];
  cfg.gridDimZ = grid[2];
  cfg.blockDimX = block[0];
  cfg.blockDimY = block[1];
  cfg.blockDimZ = block[2];
  cfg.sharedMemBytes = shared_bytes;
  cfg.attrs = attrs;
  if (cluster[0] * cluster[1] * cluster[2] > 1) {
    CUlaunchAttribute& a = attrs[cfg.numAttrs++];
    a.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    a.value.clusterDim.x = cluster[0];
    a.value.clusterDim.y = cluster[1];
    a.value.clusterDim.z = cluster[2];
  }
  if (pdl) {
    // The kernel may start before the previous kernel of the stream completes (once that
    // kernel's CTAs all issued griddepcontrol.launch_dependents or exited); the kernel's
    // griddepcontrol.wait then waits for that kernel's completion and memory. Only for
    // kernels that wait before touching global memory (runtime/plan.py LaunchPlan.pdl).
    CUlaunchAttribute& a = attrs[cfg.numAttrs++];
    a.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    a.value.programmaticStreamSerializationAllowed = 1;
  }
  if (cfg.numAttrs == 0) cfg.attrs = nullptr;
  return cfg;
}

// params: one bytes object per kernel parameter, already laid out as the kernel expects
// (pointers and integers little-endian, tensor maps as their 128-byte images).
void launch(uintptr_t function, Dim3 grid, Dim3 block, Dim3 cluster, unsigned shared_bytes,
            uintptr_t stream, const std::vector<py::bytes>& params, bool pdl) {
  std::vector<std::string> storage;
  storage.reserve(params.size());
  for (const auto& p : params) storage.emplace_back(p);
  std::vector<void*> ptrs;
  for (auto& s : storage) ptrs.push_back(s.data());
  // Tensor maps must be 64-byte aligned in the parameter buffer the driver reads; the
  // driver copies from these pointers, so only the value matters, not where it lives.

  CUlaunchAttribute attrs[2] = {};
  CUlaunchConfig cfg = launch_config(grid, block, cluster, shared_bytes, pdl, attrs);
  cfg.hStream = reinterpret_cast<CUstream>(stream);
  if (shared_bytes > 48 * 1024) set_max_dynamic_shared(function, static_cast<int>(shared_bytes));
  check(driver().cuLaunchKernelEx(&cfg, reinterpret_cast<CUfunction>(function), ptrs.data(),
                                  nullptr),
        "cuLaunchKernelEx");
}

// How many clusters of `cluster` CTAs of `function` (block threads, dynamic shared bytes)
// the device holds at once. A persistent clustered grid must not exceed it: clusters
// beyond it would run after the others (GPC sizes can make it less than #SMs / size).
int max_active_clusters(uintptr_t function, Dim3 block, Dim3 cluster, unsigned shared_bytes) {
  const auto& d = driver();
  if (!d.cuOccupancyMaxActiveClusters)
    throw std::runtime_error("cuOccupancyMaxActiveClusters: not provided by this CUDA driver");
  if (shared_bytes > 48 * 1024) set_max_dynamic_shared(function, static_cast<int>(shared_bytes));
  CUlaunchAttribute attrs[2] = {};
  // a grid of one cluster: the query asks about the cluster shape, not the grid
  CUlaunchConfig cfg = launch_config(cluster, block, cluster, shared_bytes, false, attrs);
  int n = 0;
  check(d.cuOccupancyMaxActiveClusters(&n, reinterpret_cast<CUfunction>(function), &cfg),
        "cuOccupancyMaxActiveClusters");
  return n;
}

// Encodes a CUtensorMap for tile-mode TMA; returns its 128-byte image.
py::bytes encode_tensor_map_tiled(int data_type, uintptr_t global_address,
                                  const std::vector<uint64_t>& dims,
                                  const std::vector<uint64_t>& strides_bytes,
                                  const std::vector<uint32_t>& box,
                                  const std::vector<uint32_t>& element_strides, int interleave,
                                  int swizzle, int l2_promotion, int oob_fill) {
  const size_t rank = dims.size();
  if (rank < 1 || rank > 5) throw std::invalid_argument("dims: expected 1 to 5 dimensions");
  if (strides_bytes.size() != rank - 1)
    throw std::invalid_argument("strides_bytes: expected rank - 1 strides (dimension 0 is dense)");
  if (box.size() != rank || element_strides.size() != rank)
    throw std::invalid_argument("box, element_strides: expected one entry per dimension");
  CUtensorMap map;
  check(driver().cuTensorMapEncodeTiled(
            &map, static_cast<CUtensorMapDataType>(data_type), static_cast<cuuint32_t>(rank),
            reinterpret_cast<void*>(global_address), dims.data(), strides_bytes.data(),
            box.data(), element_strides.data(), static_cast<CUtensorMapInterleave>(interleave),
            static_cast<CUtensorMapSwizzle>(swizzle),
            static_cast<CUtensorMapL2promotion>(l2_promotion),
            static_cast<CUtensorMapFloatOOBfill>(oob_fill)),
        "cuTensorMapEncodeTiled");
  return py::bytes(reinterpret_cast<const char*>(&map), sizeof(map));
}

py::bytes ipc_get_handle(uintptr_t device_ptr) {
  CUipcMemHandle h;
  check(driver().cuIpcGetMemHandle(&h, static_cast<CUdeviceptr>(device_ptr)), "cuIpcGetMemHandle");
  return py::bytes(reinterpret_cast<const char*>(&h), sizeof(h));
}

uintptr_t ipc_open_handle(py::bytes handle, int device) {
  std::string s = handle;
  CUipcMemHandle h;
  if (s.size() != sizeof(h))
    throw std::invalid_argument("handle: expected " + std::to_string(sizeof(h)) + " bytes, got " +
                                std::to_string(s.size()));
  std::memcpy(&h, s.data(), sizeof(h));
  pk::ensure_context(device);
  CUdeviceptr p = 0;
  check(driver().cuIpcOpenMemHandle(&p, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
        "cuIpcOpenMemHandle");
  return static_cast<uintptr_t>(p);
}

void ipc_close_handle(uintptr_t device_ptr) {
  check(driver().cuIpcCloseMemHandle(static_cast<CUdeviceptr>(device_ptr)), "cuIpcCloseMemHandle");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykernels host glue: lazy CUDA driver, module loading, launches, tensor maps, IPC";
  m.def("driver_available", &driver_available, "True when libcuda loads and cuInit succeeds");
  m.def("driver_error", &driver_error, "Why the driver is unavailable ('' when it is)");
  m.def("device_count", &device_count);
  m.def("load_module", &load_module, py::arg("image"), py::arg("device") = 0,
        "Load a cubin image into the primary context of a device; returns a CUmodule handle");
  m.def("get_function", &get_function, py::arg("module"), py::arg("name"));
  m.def("set_max_dynamic_shared", &set_max_dynamic_shared, py::arg("function"), py::arg("bytes"));
  m.def("launch", &launch, py::arg("function"), py::arg("grid"), py::arg("block"),
        py::arg("cluster"), py::arg("shared_bytes"), py::arg("stream"), py::arg("params"),
        py::arg("pdl") = false,
        "cuLaunchKernelEx with an optional cluster dimension and programmatic dependent launch "
        "(pdl); params are raw bytes per argument");
  m.def("encode_tensor_map_tiled", &encode_tensor_map_tiled, py::arg("data_type"),
        py::arg("global_address"), py::arg("dims"), py::arg("strides_bytes"), py::arg("box"),
        py::arg("element_strides"), py::arg("interleave"), py::arg("swizzle"),
        py::arg("l2_promotion"), py::arg("oob_fill"));
  m.def("max_active_clusters", &max_active_clusters, py::arg("function"), py::arg("block"),
        py::arg("cluster"), py::arg("shared_bytes"),
        "Clusters of the function the device holds at once (cuOccupancyMaxActiveClusters)");
  m.def("ipc_get_handle", &ipc_get_handle, py::arg("device_ptr"));
  m.def("ipc_open_handle", &ipc_open_handle, py::arg("handle"), py::arg("device") = 0);
  m.def("ipc_close_handle", &ipc_close_handle, py::arg("device_ptr"));
  m.attr("TENSOR_MAP_BYTES") = static_cast<int>(sizeof(CUtensorMap));
}
