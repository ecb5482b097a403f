"""Concurrent launches on several emulated devices sharing mapped memory (CUDA IPC-style):
ranks that wait on each other's flags make progress only if they run at the same time."""
import pytest
import torch

from pykernels import emu

PTX = """
.version 8.0
.target sm_90a
.address_size 64

.visible .entry handshake(.param .u64 my_flag, .param .u64 peer_flag, .param .u64 out,
                          .param .u32 value, .param .u32 send, .param .u32 limit)
{
  .reg .b32 %r<8>;
  .reg .b64 %rd<4>;
  .reg .pred %p<4>;
  ld.param.u64 %rd1, [my_flag];
  ld.param.u64 %rd2, [peer_flag];
  ld.param.u64 %rd3, [out];
  ld.param.u32 %r1, [value];
  ld.param.u32 %r2, [send];
  ld.param.u32 %r6, [limit];
  setp.ne.u32 %p3, %r2, 0;
  @%p3 st.release.sys.global.u32 [%rd2], %r1;
  mov.u32 %r5, 0;
WAIT:
  ld.acquire.sys.global.u32 %r3, [%rd1];
  setp.ne.u32 %p1, %r3, 0;
  @%p1 bra DONE;
  add.u32 %r5, %r5, 1;
  setp.lt.u32 %p2, %r5, %r6;
  @%p2 bra WAIT;
  trap;
DONE:
  st.global.u32 [%rd3], %r3;
  ret;
}
"""


def _ranks(send, limit=10_000):
    flags = [torch.zeros(4, dtype=torch.int32) for _ in range(2)]
    outs = [torch.full((1,), -1, dtype=torch.int32) for _ in range(2)]
    values = torch.randint(1, 1 << 30, (2,)).tolist()
    launches = [dict(ptx=PTX, kernel="handshake", grid=1, block=1,
                     args=[flags[r], flags[1 - r].data_ptr(), outs[r], values[r], send[r], limit])
                for r in range(2)]
    return launches, outs, values


def test_two_devices_exchange_flags():
    launches, outs, values = _ranks(send=[1, 1])
    stats = emu.launch_many(launches)
    # each rank received the value the other one sent
    assert outs[0].item() == values[1] and outs[1].item() == values[0]
    assert all(s.ctas == 1 for s in stats)


def test_one_launch_at_a_time_cannot_finish():
    # The same kernels run one after the other: rank 0 waits for a flag rank 1 has not
    # yet written, so it reaches its spin limit: what concurrency is needed for.
    launches, _, _ = _ranks(send=[1, 1], limit=200)
    alone = launches[0]
    peer = torch.zeros(4, dtype=torch.int32)
    alone["args"][1] = peer          # alone, the peer's buffer must be an argument to be mapped
    with pytest.raises(emu.EmuError, match="trap"):
        emu.launch(**alone)
    assert peer[0].item() != 0       # it did send before waiting


def test_stalled_rank_is_reported_by_the_waiting_kernel():
    launches, outs, values = _ranks(send=[1, 0], limit=300)
    with pytest.raises(emu.EmuError, match=r"handshake.*trap"):
        emu.launch_many(launches)
