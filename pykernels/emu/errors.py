"""Errors the emulator reports, each with its place (kernel, PTX line, CTA, thread)."""


class EmuError(Exception):
    """A bug found while emulating (or PTX the emulator cannot run), with its location."""


class UnsupportedInstruction(EmuError):
    """An instruction form the emulator does not implement: never skipped silently."""


class MemoryFault(EmuError):
    """Out-of-bounds or misaligned access."""


class Deadlock(EmuError):
    """Every live thread is blocked; the message lists each warp's PC and wait."""
