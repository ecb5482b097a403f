"""Peer kernels (DeepGEMM's SM90 kernels) compiled from their installed headers by our own
harness and run on the CPU PTX emulator, as standing tests and as the ground for comparing
our kernels with theirs (docs/peers.md). Needs `pip install --no-deps -r requirements-peers.txt`;
without it, `toolchain.PeerMissing` says so."""
