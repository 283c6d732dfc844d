"""Scanner device types: the registry (`registry`), and CycleGAN translation between them (`cyclegan`: one
translator; `translate`: one per target device, device augmentation of a manifest, evaluation on the phantom)."""
