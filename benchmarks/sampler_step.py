"""The time of one sampler step per sampler on an SD 1.5 512 x 512 latent (1, 64, 64, 4) and a 1024 x 1024 one
(1, 128, 128, 4), float32, against the time of a guided UNet step (default: 45 s, SD 1.5 512 x 512 on the
2-core development machine's CPU backend; pass --unet-seconds to compare with another figure).

    python benchmarks/sampler_step.py [--steps 30] [--size 128] [--unet-seconds 45]

Each sampler runs a whole 30-step schedule (second-order samplers: 59 model calls) on random model outputs, one
mx.eval per step as the pipeline does; the figure is the median of the per-call times (scale_model_input +
step + the evaluation), so it includes the scheduler's Python bookkeeping.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlx_sd.schedulers import SAMPLERS, make_scheduler

CONFIG = json.loads(
    (
        Path(__file__).resolve().parent.parent / "tests/configs/runwayml--stable-diffusion-v1-5/scheduler/"
        "scheduler_config.json"
    ).read_text()
)


def time_sampler(sampler, steps, size):
    """Median seconds of one call (scale_model_input + step + eval) over a whole schedule."""
    scheduler = make_scheduler(sampler, CONFIG)
    scheduler.set_timesteps(steps)
    shape = (1, size, size, 4)
    x = mx.random.normal(shape) * scheduler.init_noise_sigma
    outputs = [mx.random.normal(shape) for _ in range(4)]
    noise = mx.random.normal(shape)
    mx.eval(x, outputs, noise)
    times = []
    for i, t in enumerate(scheduler.timesteps.tolist()):
        tic = time.perf_counter()
        scaled = scheduler.scale_model_input(x, t)
        x = scheduler.step(outputs[i % 4] + 0 * scaled, t, x, noise=noise)
        mx.eval(x)
        times.append(time.perf_counter() - tic)
    return statistics.median(times), len(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--unet-seconds", type=float, default=45.0)
    args = parser.parse_args()
    print(f"{'sampler':<14}" + "".join(f"{f'{s}x{s}x4 ms':>14}{'share':>10}" for s in args.size) + f"{'calls':>7}")
    for sampler in SAMPLERS:
        row, calls = f"{sampler:<14}", 0
        for size in args.size:
            seconds, calls = time_sampler(sampler, args.steps, size)
            row += f"{seconds * 1e3:>14.2f}{seconds / args.unet_seconds:>10.1e}"
        print(row + f"{calls:>7}")


if __name__ == "__main__":
    main()
