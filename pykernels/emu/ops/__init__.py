"""Instruction handlers, registered by base opcode.

A handler is `fn(machine, instr, idx)`: idx are the indices of the threads that execute
it (at this PC, guard true). Their PCs already point at the next instruction; control
flow handlers overwrite them. To add an instruction: write a handler in the module of
its family and decorate it with @op("opcode"); see docs/emulator.md.
"""
HANDLERS = {}

TYPES = ("b8", "b16", "b32", "b64", "b128", "u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64",
         "f16", "f16x2", "bf16", "bf16x2", "f32", "f64", "pred", "e4m3x2", "e5m2x2", "tf32")


def op(*names):
    def deco(fn):
        for n in names:
            HANDLERS[n] = fn
        return fn
    return deco


def types_of(ins):
    """The type modifiers of an instruction, in order (cvt has two)."""
    return [m for m in ins.mods if m in TYPES]


from . import arith, control, convert, memory, matrix, cp_async, mbarrier, wgmma, bulk_copy, tensormap  # noqa: E402,F401,E501
