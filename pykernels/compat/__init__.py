"""Drop-in modules for the peers' users: change one import line.

    import pykernels.compat.deep_gemm as deep_gemm
    import pykernels.compat.flash_mla as flash_mla
    import pykernels.compat.deep_ep as deep_ep

Each module exposes its peer's public names with the peer's argument order, keywords, return
values and semantics where pykernels implements them, and raises NotImplementedError naming
the function where it does not (docs/compat.md lists every name). Nothing is imported here:
each module loads on its own import.
"""
