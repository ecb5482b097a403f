"""Op families: each module builds and validates its ops' problem descriptions, registers
their backends in pykernels.registry, and defines the torch custom ops
(torch.ops.pykernels.*), whose bodies validate exactly as the Python API does."""
