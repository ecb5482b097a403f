"""What the ordering checker reports: the rule broken, the shared byte, and both accesses
(PTX line, instruction, CTA, thread)."""
from ..errors import EmuError

RULES = {
    "a": "generic-proxy write read by the async proxy without fence.proxy.async by the writer",
    "b": "asynchronously written shared memory used before its completion was observed",
    "c": "unordered accesses to shared memory by different warps (data race)",
    "d": "wgmma accumulator register used before the wgmma.wait_group that covers it",
    "e": "synchronisation scope narrower than the cross-CTA access needs",
}


class OrderingViolation(EmuError):
    """A memory-ordering bug: `rule` ('a'..'e', see RULES), `address` ((CTA, offset) of
    the shared byte, or None for rules about registers and scopes), `first` and `second`
    (the two accesses, each a dict: line, text, cta, thread, what)."""

    def __init__(self, kernel, rule, address, first, second, detail=""):
        self.kernel, self.rule, self.address = kernel, rule, address
        self.first, self.second, self.detail = first, second, detail
        super().__init__(self._format())

    def _format(self):
        where = ""
        if self.address is not None:
            cta, off = self.address
            where = f" at shared offset {off:#x} of CTA {cta}"
        lines = [f"{self.kernel}: memory-ordering rule {self.rule} ({RULES[self.rule]}){where}"]
        for label, s in (("first ", self.first), ("second", self.second)):
            if s is not None:
                lines.append(f"  {label}: {s['what']} at PTX line {s['line']} ({s['text']}), "
                             f"CTA {s['cta']}, thread {s['thread']}")
        if self.detail:
            lines.append(f"  {self.detail}")
        return "\n".join(lines)

    def key(self):
        """Same rule at the same pair of PTX lines: one report in collect mode."""
        return (self.rule, self.first and self.first["line"], self.second and self.second["line"])
