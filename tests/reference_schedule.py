"""The reference release's diffusion schedule (T = 500, linear β 1e-4..0.028), written out independently of the
library so that tests can check the library against it."""

from __future__ import annotations

from dataclasses import dataclass

T, BETA_START, BETA_END = 500, 1e-4, 0.028


@dataclass(frozen=True)
class Schedule:
    """Duck-types the schedule fields of `BUSGenUNet.config` (what `ddpm_scheduler` reads)."""

    num_train_timesteps: int = T
    beta_start: float = BETA_START
    beta_end: float = BETA_END
    image_size: int = 2
