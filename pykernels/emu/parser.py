"""Parse PTX modules (ISA 8.x) into kernels of decoded instructions.

Handles what nvcc, Triton and hand-written PTX emit: module directives, module-scope
variables (.global/.shared/.const, .extern dynamic shared), .entry/.func with their
parameter lists, register declarations (`%r<48>` ranges, vectors, predicates), labels,
guards (`@%p`, `@!%p`), vector operands `{a, b}`, memory operands `[reg+imm]`, and
nested `{ }` blocks whose .reg declarations and labels are local (Triton's inline asm
repeats the same label and register names in many blocks): names declared inside a
block are renamed to block-unique names here, so the executor sees one flat scope.
"""
import dataclasses
import functools
import re

from .errors import EmuError, UnsupportedInstruction

_TYPES = {"b8", "b16", "b32", "b64", "b128", "u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64",
          "f16", "f16x2", "bf16", "bf16x2", "f32", "f64", "pred", "e4m3", "e5m2", "e4m3x2", "e5m2x2",
          "tf32", "u16x2", "s16x2"}


@dataclasses.dataclass
class Operand:
    """kind: reg | imm | fimm | vec | mem | sym | special | sink.
    reg: name; imm: int value; fimm: (bits, width); vec: list of Operand;
    mem: (base Operand or None, offset int); sym: name (label, variable or param);
    special: name like '%tid.x'. neg: logical negation (`!%p`)."""
    kind: str
    value: object
    neg: bool = False

    def __repr__(self):
        return f"{'!' if self.neg else ''}{self.kind}:{self.value}"


@dataclasses.dataclass
class Instr:
    opcode: str          # e.g. "ld"
    mods: tuple          # e.g. ("global", "nc", "v4", "f32")
    operands: list
    guard: tuple         # (pred register name, negated) or None
    line: int
    text: str

    @property
    def full(self) -> str:
        return ".".join((self.opcode,) + self.mods)


@dataclasses.dataclass
class Param:
    name: str
    ptype: str           # u32, u64, f32, b8 ...
    size: int            # bytes (arrays included)
    align: int
    offset: int = 0      # byte offset in the parameter buffer


@dataclasses.dataclass
class Variable:
    name: str
    space: str           # shared, global, const, local
    size: int            # bytes; 0 for .extern (dynamic shared)
    align: int
    extern: bool = False
    init: bytes = b""


@dataclasses.dataclass
class Kernel:
    name: str
    entry: bool
    params: list
    registers: dict      # name -> type
    instrs: list
    labels: dict         # label -> instruction index
    locals: list         # Variables declared in the body (shared/local)

    @property
    def param_bytes(self) -> int:
        return max((p.offset + p.size for p in self.params), default=0)


@dataclasses.dataclass
class Module:
    version: str
    target: str
    variables: list
    kernels: dict

    def kernel(self, name: str) -> Kernel:
        if name not in self.kernels:
            raise EmuError(f"no kernel named {name!r} in this PTX module; it has: "
                           f"{', '.join(self.kernels) or 'none'}")
        return self.kernels[name]


_TYPE_SIZE = {"8": 1, "16": 2, "32": 4, "64": 8, "128": 16, "x2": 4}


@functools.lru_cache(maxsize=None)   # called per executed instruction: cache the parse
def type_size(t: str) -> int:
    if t == "pred":
        return 1
    if t.endswith("x2"):
        return 4
    m = re.search(r"(\d+)$", t)
    if not m:
        raise EmuError(f"unknown PTX type .{t}")
    return int(m.group(1)) // 8


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _split_top(s: str, sep: str = ","):
    """Split on sep outside brackets/braces."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    tail = "".join(cur).strip()
    if tail:
        out.append(tail)
    return out


_INT = re.compile(r"^-?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)U?$")


def parse_int(tok: str):
    t = tok.rstrip("U")
    neg = t.startswith("-")
    body = t[1:] if neg else t
    if body.lower().startswith("0x"):
        v = int(body, 16)
    elif len(body) > 1 and body.startswith("0") and body.isdigit():
        v = int(body, 8)
    else:
        v = int(body)
    return -v if neg else v


def _operand(tok: str, rename, line: int) -> Operand:
    tok = tok.strip()
    neg = tok.startswith("!")
    if neg:
        tok = tok[1:].strip()
    if tok.startswith("{"):
        return Operand("vec", [_operand(t, rename, line) for t in _split_top(tok[1:-1])])
    if tok.startswith("["):
        inner = tok[1:-1].strip()
        if "," in inner:     # tensor operand of TMA: [tensorMap, {c0, c1, ...}]
            parts = _split_top(inner)
            coords = _operand(parts[1], rename, line) if len(parts) == 2 else None
            if coords is None or coords.kind != "vec":
                raise UnsupportedInstruction(f"line {line}: cannot parse tensor operand {tok!r}")
            return Operand("tensor", (_operand(parts[0], rename, line), coords.value), neg)
        m = re.match(r"^([^+\-]+?)\s*(?:([+-])\s*(\S+))?$", inner)
        if not m:
            raise UnsupportedInstruction(f"line {line}: cannot parse address operand {tok!r}")
        base, sign, off = m.groups()
        base = base.strip()
        offset = parse_int(off) * (-1 if sign == "-" else 1) if off else 0
        if _INT.match(base):
            return Operand("mem", (None, parse_int(base) + offset))
        return Operand("mem", (_operand(base, rename, line), offset))
    if tok == "_":
        return Operand("sink", None)
    if re.match(r"^-?0[fF][0-9a-fA-F]{8}$", tok):
        bits = int(tok.lstrip("-")[2:], 16) ^ (0x80000000 if tok.startswith("-") else 0)
        return Operand("fimm", (bits, 32), neg)
    if re.match(r"^-?0[dD][0-9a-fA-F]{16}$", tok):
        bits = int(tok.lstrip("-")[2:], 16) ^ ((1 << 63) if tok.startswith("-") else 0)
        return Operand("fimm", (bits, 64), neg)
    if _INT.match(tok):
        return Operand("imm", parse_int(tok), neg)
    if re.match(r"^-?\d+\.\d*([eE][-+]?\d+)?$", tok):
        import struct
        return Operand("fimm", (struct.unpack("<Q", struct.pack("<d", float(tok)))[0], 64), neg)
    if re.match(r"^%(tid|ntid|ctaid|nctaid|clusterid|nclusterid|cluster_ctaid|cluster_nctaid)\.[xyz]$", tok) or \
            tok in ("%laneid", "%warpid", "%nwarpid", "%smid", "%nsmid", "%gridid", "%cluster_ctarank",
                    "%cluster_nctarank", "%is_explicit_cluster", "%lanemask_eq", "%lanemask_lt",
                    "%lanemask_le", "%lanemask_gt", "%lanemask_ge", "%clock", "%clock64", "%globaltimer",
                    "%dynamic_smem_size", "%total_smem_size"):
        return Operand("special", tok, neg)
    name = rename(tok)
    if name is not None:
        return Operand("reg", name, neg)
    return Operand("sym", tok, neg)


_DECL = re.compile(r"^\.reg\s+(?:\.v(\d)\s+)?\.(\w+)\s+(.*)$")
_VAR = re.compile(r"^(?:\.(?:visible|extern|weak)\s+)*\.(shared|global|const|local)\s+(.*)$")


def _parse_var(stmt: str, line: int):
    m = _VAR.match(stmt)
    space, rest = m.group(1), m.group(2)
    extern = ".extern" in stmt.split(space)[0]
    init = b""
    if "=" in rest:
        rest, init_txt = rest.split("=", 1)
        init_vals = [parse_int(v) for v in _split_top(init_txt.strip().strip("{}"))]
    else:
        init_vals = []
    align = 1
    am = re.search(r"\.align\s+(\d+)", rest)
    if am:
        align = int(am.group(1))
    tm = re.findall(r"\.(\w+)", rest)
    types = [t for t in tm if t in _TYPES]
    if not types:
        raise EmuError(f"line {line}: cannot parse variable declaration {stmt!r}")
    esize = type_size(types[-1])
    nm = re.search(r"([A-Za-z_$%][\w$]*)\s*((?:\[\d*\])*)\s*$", rest.strip())
    if not nm:
        raise EmuError(f"line {line}: cannot parse variable declaration {stmt!r}")
    count = 1
    for d in re.findall(r"\[(\d*)\]", nm.group(2)):
        count *= int(d) if d else 0
    if init_vals:
        init = b"".join(int(v).to_bytes(esize, "little", signed=v < 0) for v in init_vals)
    return Variable(nm.group(1), space, esize * count, max(align, esize), extern and count == 0, init)


def _parse_params(text: str, line: int):
    params, offset = [], 0
    for p in _split_top(text):
        if not p:
            continue
        m = re.match(r"^\.param\s+(.*)$", p.strip())
        if not m:
            raise EmuError(f"line {line}: cannot parse parameter {p!r}")
        body = m.group(1)
        align = 0
        am = re.search(r"\.align\s+(\d+)", body)
        if am:
            align = int(am.group(1))
        types = [t for t in re.findall(r"\.(\w+)", body) if t in _TYPES]
        ptr = ".ptr" in body
        nm = re.search(r"([A-Za-z_$][\w$]*)\s*(\[(\d+)\])?\s*$", body)
        esize = type_size(types[-1])
        count = int(nm.group(3)) if nm.group(3) else 1
        align = align or esize
        offset = (offset + align - 1) // align * align
        params.append(Param(nm.group(1), types[-1] if not ptr else "u64", esize * count, align, offset))
        offset += esize * count
    return params


def parse(text: str) -> Module:
    """Parse a whole PTX module."""
    src = _strip_comments(text)
    # Tokenise into statements (ending in ';'), labels ('name:') and block braces, with
    # line numbers. Braces inside a statement (vector operands, initialisers) stay in it.
    items = []
    line, vec_depth = 1, 0
    buf, buf_line = [], None
    for ch in src:
        if ch == "\n":
            line += 1
            # .version/.target/.address_size/.file/.loc/.section end at the line break.
            if re.match(r"^\.(version|target|address_size|file|loc|section)\b", "".join(buf).strip()):
                items.append(("stmt", "".join(buf).strip(), buf_line))
                buf, buf_line = [], None
                continue
        if ch == "{" and (vec_depth or _brace_in_statement("".join(buf).strip())):
            vec_depth += 1
            buf.append(ch)
        elif ch == "}" and vec_depth:
            vec_depth -= 1
            buf.append(ch)
        elif ch in "{}":
            s = "".join(buf).strip()
            if s:
                items.append(("stmt", s, buf_line))
            buf, buf_line = [], None
            items.append((ch, None, line))
        elif ch == ";":
            s = "".join(buf).strip()
            if s:
                items.append(("stmt", s, buf_line))
            buf, buf_line = [], None
        else:
            if buf_line is None and not ch.isspace():
                buf_line = line
            buf.append(ch)
            if ch == ":" and re.match(r"^[A-Za-z_$][\w$]*:$", "".join(buf).strip()):
                items.append(("label", "".join(buf).strip()[:-1], buf_line))
                buf, buf_line = [], None
    return _Builder(items).module()


def _brace_in_statement(s: str) -> bool:
    """Does a '{' after the text s belong to the statement (vector operand, initialiser)
    rather than open a block? Blocks open at statement start or after a function header."""
    if not s:
        return False
    if "=" in s:
        return True
    if s.startswith("."):
        return s.count("(") > s.count(")")
    return True


class _Builder:
    def __init__(self, items):
        self.items = items
        self.pos = 0

    def module(self) -> Module:
        version = target = ""
        variables, kernels = [], {}
        while self.pos < len(self.items):
            kind, s, line = self.items[self.pos]
            self.pos += 1
            if kind != "stmt":
                continue
            if s.startswith(".version"):
                version = s.split()[1]
            elif s.startswith(".target"):
                target = s.split(None, 1)[1]
            elif s.startswith(".address_size"):
                pass
            elif re.search(r"\.(entry|func)\b", s):
                k = self._kernel(s, line)
                if k is not None:
                    kernels[k.name] = k
            elif _VAR.match(s):
                variables.append(_parse_var(s, line))
            elif s.startswith(".section"):
                self._skip_block()          # debug sections: data, no code
            elif s.startswith((".file", ".loc", ".pragma")):
                pass
            else:
                raise EmuError(f"line {line}: unexpected module-level statement {s[:60]!r}")
        return Module(version, target, variables, kernels)

    def _skip_block(self):
        if self.pos < len(self.items) and self.items[self.pos][0] == "{":
            depth = 0
            while self.pos < len(self.items):
                kind = self.items[self.pos][0]
                self.pos += 1
                depth += (kind == "{") - (kind == "}")
                if depth == 0:
                    return

    def _kernel(self, header: str, line: int):
        entry = ".entry" in header
        m = re.search(r"\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([A-Za-z_$][\w$]*)\s*(\((.*)\))?", header, re.S)
        name = m.group(1)
        params = _parse_params(m.group(3) or "", line)
        # Performance directives (.maxntid, .reqntid ...) are ignored; the body follows.
        if self.pos >= len(self.items) or self.items[self.pos][0] != "{":
            return None  # a declaration (prototype) without a body
        registers, instrs, labels, local_vars = {}, [], {}, []
        scopes = [dict()]          # name -> unique name, innermost last

        def rename(tok):
            for scope in reversed(scopes):
                if tok in scope:
                    return scope[tok]
            return None

        # Pre-scan blocks to find labels local to each block (for forward branches).
        depth, block_id, label_scope = 0, 0, {}
        stack = []
        for kind, s, ln in self.items[self.pos:]:
            if kind == "{":
                depth += 1
                block_id += 1
                stack.append(block_id)
            elif kind == "}":
                depth -= 1
                stack.pop()
                if depth == 0:
                    break
            elif kind == "label":
                label_scope.setdefault(stack[-1], []).append(s)
        depth, block_id = 0, 0
        label_maps = []
        while self.pos < len(self.items):
            kind, s, ln = self.items[self.pos]
            self.pos += 1
            if kind == "{":
                depth += 1
                block_id += 1
                scopes.append({})
                lm = {}
                for lab in label_scope.get(block_id, []):
                    lm[lab] = lab if depth == 1 else f"{lab}__b{block_id}"
                label_maps.append(lm)
                continue
            if kind == "}":
                depth -= 1
                scopes.pop()
                label_maps.pop()
                if depth == 0:
                    break
                continue
            if kind == "label":
                labels[label_maps[-1][s]] = len(instrs)
                continue
            dm = _DECL.match(s)
            if dm:
                vec, rtype, names = dm.groups()
                for nm in _split_top(names):
                    rm = re.match(r"^(%?[\w$]+)<(\d+)>$", nm.strip())
                    decl = [f"{rm.group(1)}{j}" for j in range(int(rm.group(2)))] if rm else [nm.strip()]
                    for d in decl:
                        uniq = d if depth == 1 else f"{d}__b{block_id}"
                        scopes[-1][d] = uniq
                        registers[uniq] = rtype
                continue
            if _VAR.match(s):
                local_vars.append(_parse_var(s, ln))
                continue
            if s.startswith((".loc", ".pragma", ".file", ".maxnreg", ".maxntid", ".reqntid", ".minnctapersm",
                             ".explicitcluster", ".reqnctapercluster", ".maxclusterrank")):
                continue
            try:
                instrs.append(self._instr(s, ln, rename, label_maps))
            except (ValueError, IndexError, KeyError, AttributeError) as e:
                raise UnsupportedInstruction(f"line {ln}: cannot parse the instruction {s[:80]!r} "
                                             f"({type(e).__name__}: {e})") from e
        return Kernel(name, entry, params, registers, instrs, labels, local_vars)

    @staticmethod
    def _instr(s: str, line: int, rename, label_maps) -> Instr:
        guard = None
        gm = re.match(r"^@(!?)\s*(%?[\w$]+)\s+(.*)$", s, re.S)
        if gm:
            reg = rename(gm.group(2))
            if reg is None:
                raise EmuError(f"line {line}: guard predicate {gm.group(2)} is not declared")
            guard = (reg, gm.group(1) == "!")
            s = gm.group(3)
        parts = s.split(None, 1)
        opfull = parts[0]
        ops_txt = parts[1] if len(parts) > 1 else ""
        pieces = opfull.split(".")
        operands = []
        for tok in _split_top(ops_txt):
            if "|" in tok and not tok.startswith("["):   # setp's two destinations p|q
                operands.append(Operand("vec", [_operand(t, rename, line) for t in tok.split("|")]))
                continue
            op = _operand(tok, rename, line)
            if op.kind == "sym":
                for lm in reversed(label_maps):
                    if op.value in lm:
                        op = Operand("sym", lm[op.value], op.neg)
                        break
            operands.append(op)
        return Instr(pieces[0], tuple(pieces[1:]), operands, guard, line, s.strip())
