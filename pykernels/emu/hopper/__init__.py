"""Pure semantics of Hopper-specific instructions (wgmma, ldmatrix/stmatrix, TMA, mbarrier).

Functions here take and return numpy arrays and know nothing of the executor; the
instruction handlers in ``pykernels.emu.ops`` adapt them to registers and memory.
"""
