r"""Population training's throughput: P members in one vmapped program against P separate runs.

For each P this builds the jitted chunk the trainer runs for a population of P seeds
(`population.Population.make_chunk`) and the plain chunk of one run (`train_step`), on the
synthetic data resident on the device, and times them interleaved (one population chunk, then P
plain chunks, repeated), so a machine's drift hits both alike. Images/s counts a pair of views
as one image; P separate runs one after another train at one run's rate, a population at P
times its per-member rate.

CPU, at a small width where per-step overhead dominates (the script prints its own setup and
timings):

    python benchmarks/population.py --members=1,2,4,8 --width=8 --batch_size=64 --repeats=5
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simco_jax import inputs, population, sources, train_step  # noqa: E402


def _config(args):
    from configs import simco_cifar  # noqa: PLC0415

    config = simco_cifar.get_config("smoke")
    config.update(
        backbone_width=args.width,
        batch_size=args.batch_size,
        synthetic_num_train=args.batch_size * 8,
        synthetic_image_size=32,
        crop_size=32,
    )
    return config


def _chunks(config, members: int):
    dataset = sources.load_dataset(config)
    spe = len(dataset.train_labels) // config.batch_size
    data = jax.device_put((dataset.train_images, dataset.train_labels.astype(np.int32)))

    def select(state, data, i):
        return inputs.gather_batch(state, data, steps_per_epoch=spe, batch=config.batch_size)

    shape = dataset.train_images.shape[1:]
    comps = train_step.build_components(config, dataset.num_classes, spe)
    plain_state = train_step.create_train_state(config, comps, shape)
    step = train_step.make_train_step(config, comps)
    plain = jax.jit(
        train_step.make_train_chunk(config, comps, step, chunk_size=1, select=select),
        donate_argnums=0,
    )
    pop_config = config.copy_and_resolve_references()
    pop_config.members = {"seed": list(range(members))}
    pop = population.Population(pop_config)
    pop_state = jax.jit(lambda: pop.init(dataset.num_classes, spe, shape))()
    vmapped = jax.jit(
        pop.make_chunk(dataset.num_classes, spe, chunk_size=1, select=select), donate_argnums=0
    )
    return data, (plain, plain_state), (vmapped, pop_state)


def _time(fn, state, data, calls: int):
    start = time.perf_counter()
    for _ in range(calls):
        state, metrics = fn(state, data, np.int32(1 << 30))
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", default="1,2,4,8")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved blocks per P")
    args = parser.parse_args(argv)
    config = _config(args)
    print(
        f"setup: SimCo ResNet-18 width {args.width}, batch {args.batch_size}, 32 px, resident "
        f"synthetic data; {jax.device_count()}x {jax.devices()[0].device_kind} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), jax "
        f"{jax.__version__}; {args.repeats} interleaved blocks of {args.steps} steps"
    )
    print(
        "| P | P separate runs, one after another: img/s | population: img/s per member | total |"
    )
    print("|---|---|---|---|")
    for members in [int(p) for p in args.members.split(",")]:
        data, (plain, plain_state), (vmapped, pop_state) = _chunks(config, members)
        plain_state, _ = _time(plain, plain_state, data, 1)  # compile
        pop_state, _ = _time(vmapped, pop_state, data, 1)
        plain_s = pop_s = 0.0
        for _ in range(args.repeats):
            pop_state, seconds = _time(vmapped, pop_state, data, args.steps)
            pop_s += seconds
            for _ in range(members):  # P separate runs, one after another (same program)
                plain_state, seconds = _time(plain, plain_state, data, args.steps)
                plain_s += seconds
        images = args.batch_size * args.steps * args.repeats
        separate = images * members / plain_s  # the P runs' images over their summed time
        packed = images * members / pop_s
        print(f"| {members} | {separate:.0f} | {packed / members:.0f} | {packed:.0f} |")


if __name__ == "__main__":
    main()
