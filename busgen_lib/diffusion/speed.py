"""How the sampler's network evaluations run: precision, memory format, compilation.

None of these changes the algorithm of sample.py; they change what one evaluation
of ε_θ costs. Defaults are fp32, contiguous, eager: exactly the reference.

* `precision="bf16"`: the network runs under `torch.autocast(bfloat16)`; the solver
  and guidance arithmetic stay in fp32 (ε is cast back before eq. 2's combination is
  stepped). Changes images by more than rounding, so the sample folder records it.
* `channels_last`: NHWC weights and inputs, the layout oneDNN/cuDNN convolutions prefer.
  Same arithmetic, other summation order: fp32 rounding-level differences only.
* `compile`: `torch.compile` (inductor) of the network, compiled once per model.
  Same arithmetic, fused kernels: fp32 rounding-level differences only.

The last two differ from the reference no more than another batch size does (whose
kernels also round differently), so, like the batch size, they are not part of the
settings a resume must repeat; tests/test_speed.py holds them to that.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from busgen_lib.errors import UsageError

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Speed:
    """Speed options of the sampler's network evaluations; the defaults are the fp32 reference."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown --precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")

    def settings(self) -> dict[str, str]:
        """What of these options changes an image beyond fp32 rounding (recorded in a sample folder's settings)."""
        return {"precision": self.precision}

    def check(self, device: torch.device | str) -> None:
        """Refuse bf16 on a GPU without bf16 support before any sampling (on CPU autocast emulates what it lacks)."""
        device = torch.device(device)
        if self.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                             "use --precision fp32")

    def autocast(self, device: torch.device | str) -> AbstractContextManager:
        """The context the network evaluations run in: bf16 autocast on the tensors' device, or nothing."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module to sample with: `model` in channels-last (converted in place) and/or compiled.

        Call once per model and reuse the result: compiling happens on its first
        call and is then cached on the returned module. The returned module still
        has `model`'s `config`, parameters and train/eval switch.
        """
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            model = torch.compile(model)
        return model

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """A network input in the memory format the prepared model expects."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


FP32 = Speed()
