"""Translation between scanner devices: CycleGAN (`cyclegan`: one translator) and device augmentation
(`translate`: one translator per target device, every image to every device). The device specs themselves live in
`busgen_lib.data.devices` (the phantom renders with them); the translators' evaluation in `evaluate.translation`."""
