"""pk::record_error (csrc/include/pk/error_record.cuh) for Triton programs: the device error
record of pykernels.runtime.device_errors, written by the kernels' input checks."""
import triton.language as tl

from .jit_dispatch import jit


@jit
def record_error(record_ptr, code, a0, a1, a2):
    """The first error wins: claim the record's code word, then write the three arguments and
    the program id (device_errors.RECORD_WORDS layout); a later error leaves the record as it is."""
    if tl.atomic_cas(record_ptr, 0, code) == 0:
        tl.store(record_ptr + 1, a0)
        tl.store(record_ptr + 2, a1)
        tl.store(record_ptr + 3, a2)
        tl.store(record_ptr + 4, tl.program_id(0))
        tl.store(record_ptr + 5, tl.program_id(1))
        tl.store(record_ptr + 6, tl.program_id(2))
