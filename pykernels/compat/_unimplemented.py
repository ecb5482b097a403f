"""The NotImplementedError of a peer's name that pykernels does not implement, written once
for the compat modules: it names the peer module's function and points to docs/compat.md."""


def not_implemented(module: str, name: str, what: str):
    """Raise NotImplementedError "`module`.`name`: `what` is not implemented by pykernels"."""
    raise NotImplementedError(f"{module}.{name}: {what} is not implemented by pykernels (docs/compat.md)")


def missing(module: str, peer: str, name: str, why: str):
    """A stand-in for `peer`'s function `name` (in its module `module`) that pykernels does not
    implement: any call raises not_implemented(module, name, why)."""
    def stand_in(*args, **kwargs):
        not_implemented(module, name, why)
    stand_in.__name__ = stand_in.__qualname__ = name
    stand_in.__doc__ = f"{peer}'s {name}: {why}. Not implemented: raises NotImplementedError."
    return stand_in
