"""Sampling and training throughput of BUSGen, against peers measured in the same run.

    python bench/sampling.py --profile smoke|demo|paper [--model DIR] [--full] [--bf16]

On one set of weights (a fresh model of the profile, or `--model DIR`), times

1. our reference sampler (`sample()`'s default: DPM-Solver++ singlestep, order 3, 50 steps,
   CFG w = 1.8 with both branches in one batched forward: 2·B network rows per step);
2. our fastest setting at matched quality: the profile's default sampler and step count
   (`profiles.SAMPLING`, set at the knee of bench/solver_sweep.py's steps × solver sweep),
   timed with each way of running the network (`diffusion/speed.py`: fp32 or bf16 autocast,
   contiguous or channels-last); the fastest of these is the row the ratios use (bf16's
   effect on the images is measured by the solver sweep, not here);
3. diffusers' stock `DDPMPipeline`, unmodified, 1000 ancestral steps, unguided (B rows per
   step). Its network is ours behind a small adapter that runs it with null conditions;
   its scheduler is a `DDPMScheduler` with T' = 1000 and the model's linear β range
   scaled by T/T' (the same noise process on a 1000-step grid), and the adapter maps
   t' → t'·T/T' for the network;
4. our DDPM ancestral sampler (`sample(sampler="ddpm")`, all T steps, guided);
5. training: forward + backward + AdamW steps with the profile's training batch on random
   data in the dataset's format (the loss of eq. 1, gradient clipping as in train.py);

and, on a GPU under `paper`, seconds per image of the reference sampler (160 px,
DPM-Solver++ singlestep order 3, 50 steps, CFG) at batch sizes 1 and 16.

The samplers are timed in turn for a few rounds (so that they share the same moments of a
busy machine) and the best round counts. The two long chains (3, 4) are timed in full under
`paper` and with `--full`; otherwise a k-step run of the same sampler and pipeline is timed
(an ancestral step costs the same whatever the step count) and scaled by full/k, which the
output says. Results go to runs/bench/sampling-<profile>.json. Never part of the unit tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, best_of_interleaved, environment, print_table, timed, write_json  # noqa: E402

from busgen_lib.data.dataset import boxes_to_mask  # noqa: E402
from busgen_lib.data.devices import device_names  # noqa: E402
from busgen_lib.diffusion.model import (SAMPLING_DEFAULTS, BUSGenUNet, SamplingDefaults, build_model,  # noqa: E402
                                        count_parameters)  # noqa: E402
from busgen_lib.diffusion.sample import sample  # noqa: E402
from busgen_lib.diffusion.schedule import diffusion_loss  # noqa: E402
from busgen_lib.diffusion.speed import FP32, Speed  # noqa: E402
from busgen_lib.diffusion.train import train_config  # noqa: E402
from busgen_lib.profiles import PROFILES  # noqa: E402

REFERENCE = SamplingDefaults()  # the paper's reference: DPM-Solver++ singlestep, order 3, 50 steps, w = 1.8
SPEEDS = {"fp32": FP32, "fp32 channels-last": Speed(channels_last=True), "bf16": Speed("bf16"),
          "bf16 channels-last": Speed("bf16", channels_last=True)}
STOCK_STEPS = 1000
WARMUP_STEPS = 2


# --------------------------------------------------------------------------- how much to time per profile

@dataclass(frozen=True)
class Plan:
    batch: int               # images per sampling call, the same for all samplers
    rounds: int              # interleaved timing rounds of the samplers; the best round counts
    long_steps: int | None   # steps timed of the two long ancestral chains; None = the full chain
    train_steps: int         # optimisation steps timed one by one (after one warm-up step); the best counts


PLANS: dict[str, Plan] = {
    "smoke": Plan(batch=4, rounds=3, long_steps=25, train_steps=3),   # seconds on 2 idle CPU cores
    "demo": Plan(batch=4, rounds=3, long_steps=50, train_steps=3),    # ≈ 1–2 min on 2 (busy) CPU cores
    "paper": Plan(batch=16, rounds=2, long_steps=None, train_steps=10),  # a GPU
}
PAPER_ON_CPU = Plan(batch=2, rounds=1, long_steps=3, train_steps=1)  # only to check that it runs


# --------------------------------------------------------------------------- inputs

def random_batch(model: BUSGenUNet, batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random data in the dataset's format: image in [-1, 1], labels (0 = null, so 1..), one box, its mask."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    size = config.image_size
    centre, half = torch.rand(batch, 2, generator=g) * 0.5 + 0.25, torch.rand(batch, 2, generator=g) * 0.15 + 0.05
    boxes = torch.zeros(batch, config.max_boxes, 4)
    boxes[:, 0] = torch.cat((centre - half, centre + half), dim=1)
    valid = torch.zeros(batch, config.max_boxes, dtype=torch.bool)
    valid[:, 0] = True
    data = {
        "image": torch.rand(batch, 1, size, size, generator=g) * 2 - 1,
        "pathology": torch.randint(1, 4, (batch,), generator=g),
        "device": torch.randint(1, len(config.device_names) + 1, (batch,), generator=g),
        "boxes": boxes,
        "box_valid": valid,
        "box_mask": boxes_to_mask(boxes, size)[:, None],
    }
    return {k: v.to(device) for k, v in data.items()}


def conditions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "image"}


# --------------------------------------------------------------------------- the stock pipeline's view of our network

class StockUNetAdapter(nn.Module):
    """Our network as `DDPMPipeline` expects a UNet: `unet(x, t).sample`, `config.in_channels/sample_size`.

    Runs the model with its null conditions (`force_drop`), i.e. unconditional and
    unguided, and maps the pipeline's timestep t' on a grid of `stock_timesteps` to
    the model's t = t'·T / stock_timesteps.
    """

    def __init__(self, model: BUSGenUNet, stock_timesteps: int):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(in_channels=1, sample_size=model.config.image_size)
        self.t_scale = model.config.num_train_timesteps / stock_timesteps

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> UNet2DOutput:
        batch = x.shape[0]
        null = torch.zeros(batch, dtype=torch.long, device=x.device)
        t = torch.as_tensor(t, device=x.device) * self.t_scale
        eps = self.model(x, t, null, null, force_drop=torch.ones(batch, dtype=torch.bool, device=x.device))
        return UNet2DOutput(sample=eps)


def stock_pipeline(model: BUSGenUNet) -> DDPMPipeline:
    """diffusers' DDPMPipeline over T' = 1000 steps of the model's noise process (β's scaled by T/T')."""
    config = model.config
    scale = config.num_train_timesteps / STOCK_STEPS
    scheduler = DDPMScheduler(num_train_timesteps=STOCK_STEPS, beta_start=config.beta_start * scale,
                              beta_end=config.beta_end * scale, beta_schedule="linear")
    pipe = DDPMPipeline(unet=StockUNetAdapter(model, STOCK_STEPS).eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- the benchmarks

def row(name: str, *, images: int, batch: int, steps: int, rows_per_step: int, seconds: list[float],
        steps_timed: int | None = None, note: str = "") -> dict[str, object]:
    """One result from the best of `seconds`; when only `steps_timed` of `steps` ran, scaled to the full chain."""
    best = min(seconds)
    full = best if steps_timed is None else best * steps / steps_timed
    timing = f"best of {len(seconds)}" + ("" if steps_timed is None else f", {steps_timed}/{steps} steps scaled")
    return {"name": name, "images": images, "batch": batch, "steps": steps, "net_rows_per_step": rows_per_step,
            "seconds_timed": [round(x, 4) for x in seconds], "seconds": round(full, 4),
            "images_per_s": images / full, "s_per_image": full / images, "timing": timing, "note": note}


def bench_samplers(model: BUSGenUNet, plan: Plan, device: torch.device, long_steps: int | None,
                   rounds: int) -> list[dict[str, object]]:
    """Rows 1–4: our reference and fastest settings and the two ancestral chains, interleaved round by round."""
    cond = conditions(random_batch(model, plan.batch, device))
    fastest = SAMPLING_DEFAULTS[model.config.profile]
    T = model.config.num_train_timesteps
    pipe = stock_pipeline(model)

    # Each speed option's network; channels-last converts weights, so it gets its own copy (fp32: the model itself).
    prepared = {name: speed.prepare(copy.deepcopy(model) if speed.channels_last else model)
                for name, speed in SPEEDS.items()}

    def ours(setting: SamplingDefaults, steps: int | None = None, speed: str = "fp32") -> None:
        sample(prepared[speed], cond, sampler=setting.sampler, steps=steps or setting.steps, order=setting.order,
               guidance=setting.guidance, generator=torch.Generator(device).manual_seed(0), progress=False,
               speed=SPEEDS[speed])

    def stock(steps: int) -> None:
        pipe(batch_size=plan.batch, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0),
             output_type="pt")

    ddpm = SamplingDefaults("ddpm", T, 1, REFERENCE.guidance)
    # Warm-up (allocator, kernels, lazy imports), excluded from the timings.
    ours(REFERENCE, WARMUP_STEPS), ours(ddpm, WARMUP_STEPS), stock(WARMUP_STEPS)
    for name in SPEEDS:
        ours(fastest, WARMUP_STEPS, name)

    stock_k = min(long_steps or STOCK_STEPS, STOCK_STEPS)
    ddpm_k = min(long_steps or T, T)
    seconds = best_of_interleaved({
        "reference": lambda: ours(REFERENCE),
        **{name: (lambda name=name: ours(fastest, speed=name)) for name in SPEEDS},
        "stock": lambda: stock(stock_k),
        "ddpm": lambda: ours(ddpm, ddpm_k),
    }, rounds, device)

    def describe(s: SamplingDefaults) -> str:
        return f"{s.sampler} order {s.order}, {s.steps} steps, w={s.guidance}: cond + uncond in one batched forward"

    return [
        row("ours reference (CFG)", images=plan.batch, batch=plan.batch, steps=REFERENCE.steps,
            rows_per_step=2 * plan.batch, seconds=seconds["reference"], note=describe(REFERENCE)),
        *(row(f"ours fastest setting, {name}", images=plan.batch, batch=plan.batch, steps=fastest.steps,
              rows_per_step=2 * plan.batch, seconds=seconds[name],
              note=describe(fastest) + f"; profiles.SAMPLING[{model.config.profile!r}], {name}")
          for name in SPEEDS),
        row("stock DDPMPipeline", images=plan.batch, batch=plan.batch, steps=STOCK_STEPS,
            rows_per_step=plan.batch, seconds=seconds["stock"], steps_timed=None if stock_k == STOCK_STEPS else stock_k,
            note=f"diffusers as shipped, UNGUIDED (null conditions, one forward of B per step); "
                 f"DDPMScheduler T'={STOCK_STEPS}, the model's betas x {T}/{STOCK_STEPS}"),
        row("ours DDPM ancestral (CFG)", images=plan.batch, batch=plan.batch, steps=T,
            rows_per_step=2 * plan.batch, seconds=seconds["ddpm"], steps_timed=None if ddpm_k == T else ddpm_k,
            note=f"sample(sampler='ddpm'), all T={T} steps, w={REFERENCE.guidance}"),
    ]


def bench_training(model: BUSGenUNet, plan: Plan, device: torch.device, bf16: bool) -> dict[str, object]:
    """Row 4: optimisation steps as train.py takes them (AdamW, clipping), on a copy so the sampled weights stay put."""
    config = train_config(model.config.profile)
    net = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    batch = random_batch(net, config.batch_size, device, seed=1)
    use_bf16 = bf16 and device.type == "cuda"

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext():
            loss = diffusion_loss(net, batch)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (AdamW state allocation)
    seconds = [timed(step, device) for _ in range(plan.train_steps)]
    return row("training fwd+bwd+AdamW", images=config.batch_size, batch=config.batch_size, steps=1,
               rows_per_step=config.batch_size, seconds=seconds,
               note=f"one optimisation step on random data, eq. 1 loss, batch of profiles.PRETRAIN[{model.config.profile!r}]"
                    + (", bf16 autocast" if use_bf16 else ", fp32"))


def bench_reference_gpu(model: BUSGenUNet, device: torch.device, bf16: bool) -> list[dict[str, object]]:
    """Seconds per image of the reference sampler (DPM-Solver++ singlestep, order 3, 50 steps, CFG); paper: ≈2.14 s on an RTX 4090."""
    defaults = SAMPLING_DEFAULTS["paper"]
    rows = []
    for precision in ("fp32", "bf16") if bf16 else ("fp32",):
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        for batch, calls in ((1, 3), (16, 2)):
            cond = conditions(random_batch(model, batch, device))

            def run(steps: int) -> None:
                with autocast:
                    sample(model, cond, sampler=defaults.sampler, steps=steps, order=defaults.order,
                           guidance=defaults.guidance, generator=torch.Generator(device).manual_seed(0),
                           progress=False)

            run(defaults.steps)  # warm-up, excluded
            seconds = [timed(lambda: run(defaults.steps), device) for _ in range(calls)]
            rows.append(row(f"reference sampler {precision}", images=batch, batch=batch,
                            steps=defaults.steps, rows_per_step=2 * batch, seconds=seconds,
                            note=f"{defaults.sampler} order {defaults.order}, w={defaults.guidance}, "
                                 f"{model.config.image_size} px"))
    return rows


# --------------------------------------------------------------------------- main

def bf16_matches(profile: str, setting: SamplingDefaults) -> bool:
    """Whether the last solver sweep of `profile` found bf16 samples of `setting` to match the full chain's."""
    path = REPO / "runs" / "bench" / f"solver_sweep-{profile}.json"
    if not path.exists():
        return False
    rows = json.loads(path.read_text())["rows"]
    return any(r["precision"] == "bf16" and r["sampler"] == setting.sampler and r["steps"] == setting.steps
               and r["order"] == setting.order and r["matches"] for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=list(PROFILES), default="demo", help="run profile (model size, counts)")
    parser.add_argument("--model", type=Path, help="a trained model folder to load instead of a fresh model")
    parser.add_argument("--full", action="store_true", help="time the long ancestral chains in full, never scaled")
    parser.add_argument("--bf16", action="store_true", help="GPU only: bf16 autocast for training and extra "
                                                            "bf16 rows for the reference sampler")
    parser.add_argument("--rounds", type=int, help="timing rounds of the samplers (default: the profile's plan)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-training", action="store_true", help="time the samplers only")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.model:
        from busgen_lib.diffusion.checkpoint import load_model
        model = load_model(args.model)
    else:
        model = build_model(args.profile, device_names())
    model = model.to(device).eval()
    profile = model.config.profile
    plan = PAPER_ON_CPU if profile == "paper" and device.type == "cpu" else PLANS[profile]

    env = environment(device)
    print(f"busgen sampling benchmark — profile {profile}, {model.config.image_size} px, "
          f"{count_parameters(model) / 1e6:.2f}M parameters, {'trained: ' + str(args.model) if args.model else 'fresh weights'}")
    print("  " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if device.type == "cpu" and (env["load_average_1min"] or 0) > (env["cpu_count"] or 1):
        print("  note: the CPU is busy with other work; absolute times are inflated (with several torch threads "
              "by far the most), ratios less so. `--threads 1` is steadier on a shared machine.")

    rows = bench_samplers(model, plan, device, None if args.full else plan.long_steps, args.rounds or plan.rounds)
    if not args.skip_training:
        rows.append(bench_training(model, plan, device, args.bf16))
    if device.type == "cuda" and profile == "paper":
        rows += bench_reference_gpu(model, device, args.bf16)

    print()
    print_table(rows, ["name", "images", "batch", "steps", "net_rows_per_step", "seconds", "images_per_s",
                       "s_per_image", "timing"])
    for r in rows:
        print(f"  {r['name']}: {r['note']}")

    ips = {r["name"]: r["images_per_s"] for r in rows}
    allowed = [f"ours fastest setting, {name}" for name in SPEEDS
               if SPEEDS[name].precision == "fp32" or bf16_matches(profile, SAMPLING_DEFAULTS[profile])]
    best = max(allowed, key=ips.get)
    print(f"\nfastest at matched quality: {best} (bf16 counts only where bench/solver_sweep.py found its samples "
          f"to match the reference: {'yes' if len(allowed) == len(SPEEDS) else 'no or not measured'})")
    ratios = {
        "fastest_vs_stock_ddpm_pipeline": ips[best] / ips["stock DDPMPipeline"],
        "reference_vs_stock_ddpm_pipeline": ips["ours reference (CFG)"] / ips["stock DDPMPipeline"],
        "fastest_vs_reference": ips[best] / ips["ours reference (CFG)"],
        "fastest_bf16_vs_fp32": ips["ours fastest setting, bf16"] / ips["ours fastest setting, fp32"],
        "fastest_channels_last_vs_contiguous": ips["ours fastest setting, fp32 channels-last"] / ips["ours fastest setting, fp32"],
        "our_ddpm_vs_stock_ddpm_pipeline": ips["ours DDPM ancestral (CFG)"] / ips["stock DDPMPipeline"],
    }
    print()
    for key, text in (("fastest_vs_stock_ddpm_pipeline", "ours fastest at matched quality vs stock DDPMPipeline"),
                      ("reference_vs_stock_ddpm_pipeline", "ours reference vs stock DDPMPipeline"),
                      ("fastest_vs_reference", "ours fastest vs ours reference"),
                      ("fastest_bf16_vs_fp32", "bf16 autocast vs fp32 (fastest setting)"),
                      ("fastest_channels_last_vs_contiguous", "channels-last vs contiguous (fastest setting, fp32)"),
                      ("our_ddpm_vs_stock_ddpm_pipeline", "ours DDPM (guided, 2B rows/step) vs stock (unguided, B rows)")):
        print(f"{text}: {ratios[key]:.2f}x images/s")

    path = write_json(f"sampling-{profile}", {
        "profile": profile, "image_size": model.config.image_size, "parameters": count_parameters(model),
        "weights": str(args.model) if args.model else "fresh", "full": args.full, "bf16": args.bf16,
        "environment": env, "plan": asdict(plan),
        "rows": rows, "ratios": ratios,
    })
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
