"""The `paper` profile on one GPU, fastest settings, in under 5 minutes; run through bench/gpu.sh.

    bench/gpu.sh                                   # on a machine with a CUDA GPU
    python bench/gpu.py --allow-cpu --profile smoke --no-compile --budget 10   # CPU check of the script

Prints, beside the paper's ≈ 2.14 s/image on an RTX 4090 (§4.3.2 reference sampler:
DPM-Solver++ singlestep order 3, 50 steps, CFG w = 1.8, both branches in one batch):

1. the peer: fp32, eager, batch 1, the full chain;
2. the fast setting (bf16 autocast where supported, channels-last, `torch.compile`): batch 1, full chain;
3. the same at the best batch: batch sizes double from 1 while seconds/image improve by
   ≥ 5 % (each probed with a short chain, scaled to the full one, after an untimed call
   that absorbs compilation), until memory or the time budget runs out; the best is then
   timed with the full chain;
4. training images/s: one optimisation step as bench/sampling.py times it (bf16 autocast, eager).

Fresh weights (speed does not depend on training). Without a GPU it prints one line and exits 0.
Results: runs/bench/gpu-<profile>.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, timed, write_json  # noqa: E402
from sampling import Plan, bench_training, conditions, random_batch, row  # noqa: E402

from busgen_lib.data.devices import device_names  # noqa: E402
from busgen_lib.diffusion.model import SAMPLING_DEFAULTS, build_model, count_parameters  # noqa: E402
from busgen_lib.diffusion.sample import sample  # noqa: E402
from busgen_lib.diffusion.speed import Speed  # noqa: E402
from busgen_lib.profiles import PROFILES  # noqa: E402

PAPER_SECONDS_PER_IMAGE = 2.14  # BUSGen §4.3.2, one RTX 4090
PROBE_STEPS = 6                 # steps of a batch-size probe (two order-3 macro-steps), scaled to the full chain
GAIN = 0.05                     # a larger batch must cut seconds/image by this fraction to go on doubling


def search_batches(seconds_per_image: Callable[[int], float], *, largest: int = 1024, gain: float = GAIN,
                   deadline: float = math.inf, clock: Callable[[], float] = time.monotonic) -> dict[int, float]:
    """Seconds/image at batch 1, 2, 4, …: stops when one does not improve on the best so far by `gain`,
    at `largest`, when the GPU runs out of memory, or once `clock()` passes `deadline` (returns what it has)."""
    results: dict[int, float] = {}
    batch = 1
    while batch <= largest and clock() < deadline:
        try:
            seconds = seconds_per_image(batch)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break
        best = min(results.values(), default=math.inf)
        results[batch] = seconds
        if seconds > (1 - gain) * best:
            break
        batch *= 2
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=list(PROFILES), default="paper", help="run profile (model size)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (a check "
                                                                 "that the script works; use --profile smoke)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (e.g. no C compiler)")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds for the batch-size search, compilation included (default: 120)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("bench/gpu.sh: no CUDA GPU on this machine; nothing measured (run it where a GPU is available)")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
    fast = Speed(precision="bf16" if bf16 else "fp32", channels_last=True, compile=not args.no_compile)
    defaults = SAMPLING_DEFAULTS[args.profile]
    torch.manual_seed(0)
    model = build_model(args.profile, device_names()).to(device).eval()
    print(f"busgen GPU benchmark — profile {args.profile}, {model.config.image_size} px, "
          f"{count_parameters(model) / 1e6:.2f}M parameters, fresh weights; "
          f"{defaults.sampler} order {defaults.order}, {defaults.steps} steps, w = {defaults.guidance}")
    print("  " + ", ".join(f"{k} {v}" for k, v in environment(device).items()), flush=True)

    def run(network: torch.nn.Module, speed: Speed, batch: int, steps: int) -> float:
        cond = conditions(random_batch(model, batch, device))
        return timed(lambda: sample(network, cond, sampler=defaults.sampler, steps=steps, order=defaults.order,
                                    guidance=defaults.guidance, seeds=range(batch), progress=False, speed=speed),
                     device)

    peer = Speed()
    run(model, peer, 1, 2)  # warm-up: kernels, allocator
    rows = [row("fp32 eager (peer)", images=1, batch=1, steps=defaults.steps, rows_per_step=2,
                seconds=[run(model, peer, 1, defaults.steps)])]

    network = fast.prepare(model)
    start = time.monotonic()
    run(network, fast, 1, 2)  # compiles
    print(f"  warm-up of the fast setting (compilation): {time.monotonic() - start:.1f} s", flush=True)
    label = f"{fast.precision}, channels-last{', compiled' if fast.compile else ''}"
    rows.append(row(f"{label}, batch 1", images=1, batch=1, steps=defaults.steps, rows_per_step=2,
                    seconds=[run(network, fast, 1, defaults.steps)]))

    def probe(batch: int) -> float:
        run(network, fast, batch, 2)  # a new batch shape may recompile: untimed
        return run(network, fast, batch, PROBE_STEPS) * defaults.steps / PROBE_STEPS / batch

    probes = search_batches(probe, deadline=start + args.budget)
    print(f"  batch search (s/image, scaled from {PROBE_STEPS} steps): "
          + ", ".join(f"{b}: {s:.4g}" for b, s in probes.items()), flush=True)
    best = min(probes, key=probes.get)
    rows.append(row(f"{label}, best batch", images=best, batch=best, steps=defaults.steps, rows_per_step=2 * best,
                    seconds=[run(network, fast, best, defaults.steps)]))
    rows.append(bench_training(model, Plan(batch=1, rounds=1, long_steps=None, train_steps=5), device, bf16=bf16))

    print()
    print_table(rows, ["name", "batch", "steps", "s_per_image", "images_per_s", "timing"])
    print(f"\npaper (RTX 4090, 160 px): {PAPER_SECONDS_PER_IMAGE} s/image; here ({args.profile}, {device.type}): "
          f"{rows[1]['s_per_image']:.4g} s/image at batch 1 ({PAPER_SECONDS_PER_IMAGE / rows[1]['s_per_image']:.1f}x), "
          f"{rows[2]['s_per_image']:.4g} s/image at batch {best} "
          f"({PAPER_SECONDS_PER_IMAGE / rows[2]['s_per_image']:.1f}x); fast vs fp32 eager at batch 1: "
          f"{rows[0]['s_per_image'] / rows[1]['s_per_image']:.2f}x; training {rows[3]['images_per_s']:.4g} images/s")
    path = write_json(f"gpu-{args.profile}", {"profile": args.profile, "environment": environment(device),
                                               "speed": asdict(fast), "probes": probes, "rows": rows,
                                               "paper_s_per_image": PAPER_SECONDS_PER_IMAGE})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
