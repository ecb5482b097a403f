"""DeepGEMM's SM90 FP8 MQA logits kernel (deep_gemm/impls/sm90_fp8_mqa_logits.cuh: the
DeepSeek-V3.2 indexer's scores for ragged prefill windows) compiled by our instantiation
and launched on the emulator with parameters and tensor maps built here (docs/peers.md).

For query row i and key row j in its window ks[i] <= j < ke[i]:
    logits[i, j - ks[i]] = sum_h weights[i, h] * relu(q[i, h, :] . kv[j, :]) * kv_scales[j]
(the kernel writes each row compressed: column 0 is key ks[i]); nothing else is written.
"""
import dataclasses

import torch

from pykernels import emu
from pykernels.runtime.hardware import SMEM_PER_BLOCK, round_up
from pykernels.runtime.tensormap import TensorMapDesc

from . import toolchain
from .checks import check_tensor, check_tma_rows

TMA_THREADS = 128
BARRIER_BYTES = 8

_SOURCE = """// pykernels peer harness: one DeepGEMM SM90 FP8 MQA logits instantiation.
#include <deep_gemm/impls/sm90_fp8_mqa_logits.cuh>

// Taking the kernel's address instantiates it for the template arguments below.
void* pk_peer_instantiate() {{
    return reinterpret_cast<void*>(&deep_gemm::sm90_fp8_mqa_logits<{args}>);
}}
"""


@dataclasses.dataclass(frozen=True)
class MqaLogitsConfig:
    """num_heads (a multiple of 8) and head_dim (32, 64 or 128) are compiled in; one CTA
    takes block_q query rows (block_q * num_heads <= 256: one wgmma N) against block_kv
    keys per step, with block_kv / 64 math warpgroups; q_stages / kv_stages: pipeline
    depths; num_sms: the persistent grid (query blocks num_sms apart go to one CTA)."""
    num_heads: int
    head_dim: int
    block_q: int
    block_kv: int
    q_stages: int
    kv_stages: int
    num_sms: int

    def __post_init__(self):
        if self.num_heads % 8 or self.num_heads < 8:
            raise ValueError(f"num_heads: expected a positive multiple of 8, got {self.num_heads}")
        if self.head_dim not in (32, 64, 128):
            raise ValueError(f"head_dim: expected 32, 64 or 128, got {self.head_dim}")
        if self.block_q < 1 or self.block_q * self.num_heads > 256:
            raise ValueError(f"block_q: block_q * num_heads must be in [8, 256], got {self.block_q} x "
                             f"{self.num_heads}")
        if self.block_kv % 64 or self.block_kv < 64:
            raise ValueError(f"block_kv: expected a positive multiple of 64 (64 keys per math warpgroup), "
                             f"got {self.block_kv}")
        if min(self.q_stages, self.kv_stages, self.num_sms) < 1:
            raise ValueError("q_stages, kv_stages, num_sms: expected positive values, got "
                             f"{self.q_stages}, {self.kv_stages}, {self.num_sms}")
        if self.shared_bytes > SMEM_PER_BLOCK:
            raise ValueError(f"q_stages/kv_stages: {self.shared_bytes} bytes of shared memory exceed {SMEM_PER_BLOCK}")

    @property
    def math_threads(self) -> int:
        return 2 * self.block_kv

    @property
    def threads(self) -> int:
        return TMA_THREADS + self.math_threads

    @property
    def shared_bytes(self) -> int:
        """Q stages (fp8), KV stages (fp8), weights per Q stage and key scales per KV stage
        (f32), then a full and an empty barrier per Q stage and per KV stage."""
        q_rows = self.block_q * self.num_heads
        return (self.q_stages * (q_rows * self.head_dim + q_rows * 4)
                + self.kv_stages * (self.block_kv * self.head_dim + self.block_kv * 4)
                + 2 * (self.q_stages + self.kv_stages) * BARRIER_BYTES)

    def template_args(self) -> str:
        return ", ".join(str(x) for x in (self.num_heads, self.head_dim, self.block_q, self.block_kv,
                                          self.q_stages, self.kv_stages, self.num_sms, TMA_THREADS,
                                          self.math_threads, "float"))


@dataclasses.dataclass(frozen=True)
class CompiledMqaLogits:
    config: MqaLogitsConfig
    ptx: toolchain.PeerPTX
    package: str


def compile_mqa_logits(num_heads: int, head_dim: int, *, block_q: int, block_kv: int = 128, q_stages: int = 3,
                       kv_stages: int = 3, num_sms: int) -> CompiledMqaLogits:
    """Instantiate and compile (cached) DeepGEMM's sm90_fp8_mqa_logits with float logits."""
    cfg = MqaLogitsConfig(num_heads, head_dim, block_q, block_kv, q_stages, kv_stages, num_sms)
    headers = toolchain.deep_gemm_headers()
    ptx = toolchain.compile_to_ptx(_SOURCE.format(args=cfg.template_args()), headers)
    return CompiledMqaLogits(cfg, ptx, f"{headers.dist} {headers.version}")


def logits_rows(compiled: CompiledMqaLogits, seq_len: int) -> int:
    """Rows the logits buffer needs: the kernel writes whole query blocks, so the rows of
    the last block past seq_len are written too (with the last row's window)."""
    return round_up(seq_len, compiled.config.block_q)


def mqa_logits_args(compiled: CompiledMqaLogits, q, kv, kv_scales, weights, ks, ke, logits) -> list:
    """The kernel's parameters in order: seq_len, seq_len_kv, stride_logits (elements),
    ks, ke (u32 pointers), logits pointer, then the Q, KV, KV-scale and weight tensor maps."""
    cfg = compiled.config
    seq_len, seq_len_kv = q.shape[0], kv.shape[0]
    check_tensor("q", q, torch.float8_e4m3fn, (seq_len, cfg.num_heads, cfg.head_dim))
    check_tensor("kv", kv, torch.float8_e4m3fn, (seq_len_kv, cfg.head_dim))
    check_tensor("kv_scales", kv_scales, torch.float32, (seq_len_kv,))
    check_tensor("weights", weights, torch.float32, (seq_len, cfg.num_heads))
    check_tensor("ks", ks, torch.int32, (seq_len,))
    check_tensor("ke", ke, torch.int32, (seq_len,))
    if not q.is_contiguous():
        raise ValueError("q: expected a contiguous [seq_len, num_heads, head_dim] tensor")
    for name, t in (("kv", kv), ("weights", weights)):
        check_tma_rows(name, t)
    if seq_len_kv % 4:
        raise ValueError(f"kv: seq_len_kv must be a multiple of 4 (16-byte TMA rows of kv_scales), got {seq_len_kv}")
    if not kv_scales.is_contiguous() or kv_scales.data_ptr() % 16:
        raise ValueError("kv_scales: expected a contiguous, 16-byte aligned tensor")
    if bool(((ks < 0) | (ks > ke) | (ke > seq_len_kv)).any()):
        raise ValueError(f"ks/ke: expected 0 <= ks[i] <= ke[i] <= seq_len_kv ({seq_len_kv})")
    width = int((ke - ks).max()) if seq_len else 0
    rows = logits_rows(compiled, seq_len)
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.shape[0] < rows or logits.shape[1] < width \
            or logits.stride(1) != 1:
        raise ValueError(f"logits: expected float32 [>= {rows}, >= {width}] with contiguous rows, got "
                         f"{logits.dtype} {list(logits.shape)} strides {logits.stride()}")
    maps = [TensorMapDesc(q.view(seq_len * cfg.num_heads, cfg.head_dim),
                          (cfg.block_q * cfg.num_heads, cfg.head_dim), cfg.head_dim),
            TensorMapDesc(kv, (cfg.block_kv, cfg.head_dim), cfg.head_dim),
            TensorMapDesc(kv_scales.view(1, seq_len_kv), (1, cfg.block_kv), 0),
            TensorMapDesc(weights, (cfg.block_q, cfg.num_heads), 0)]
    return [seq_len, seq_len_kv, logits.stride(0), ks, ke, logits, *maps]


def launch_mqa_logits(compiled: CompiledMqaLogits, q, kv, kv_scales, weights, ks, ke, logits, *,
                      schedule="lockstep", **launch_options):
    """Run the compiled kernel on the emulator.

    q: e4m3 [seq_len, num_heads, head_dim]; kv: e4m3 [seq_len_kv, head_dim] (seq_len_kv a
    multiple of 4); kv_scales: f32 [seq_len_kv]; weights: f32 [seq_len, num_heads];
    ks, ke: int32 [seq_len], 0 <= ks <= ke <= seq_len_kv; logits: f32
    [>= logits_rows(seq_len), >= max(ke - ks)], row i column c = key ks[i] + c. Returns Stats.
    """
    cfg = compiled.config
    args = mqa_logits_args(compiled, q, kv, kv_scales, weights, ks, ke, logits)
    return emu.launch(compiled.ptx.ptx, compiled.ptx.entry, (cfg.num_sms, 1, 1), (cfg.threads, 1, 1), args,
                      shared_mem=cfg.shared_bytes, schedule=schedule, **launch_options)

