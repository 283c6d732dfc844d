"""Scanner device types: the registry, and (later) CycleGAN translation between them."""
