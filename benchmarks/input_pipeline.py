r"""Streaming input: host pipeline throughput per core, and the end-to-end step against resident.

    python benchmarks/input_pipeline.py                      # generated ImageNet-like JPEGs
    python benchmarks/input_pipeline.py --image_dir=DIR      # real JPEGs (any folder tree)
    python benchmarks/input_pipeline.py --json=out.json

1. Host pipeline: decoded and cropped image *pairs* per second (two RandomResizedCrop views of
   one decode, resized to 224×224, uint8) for each candidate loader, with 1 and 2 threads:
   * grain + PIL (what `simco_jax.streaming` runs): `streaming.grain_batches` over our
     `streaming.train_example` (a batch per grain task), `ReadOptions(num_threads=T)`;
   * tf.data + tf.image: `tf.io.decode_jpeg`, two `crop_to_bounding_box`, bilinear
     `tf.image.resize(antialias=True)`, `num_parallel_calls=T`, private thread pool of T.
   From the one-thread figure: host cores needed to feed one GPU at 3,000 img/s (ResNet-50).
2. End-to-end: the smoke SimCo step (width-4 ResNet-18, 16×16 crops, batch 32) fed by the
   resident input and by the streaming input (one thread) from the same in-memory images, timed
   in alternating rounds after warm-up: wall-clock seconds per step and the process's CPU
   seconds per step (the step's and the host pipeline's threads: on a CPU they share the cores).
The generated JPEGs are ~400×350 and ~110 KB, like ImageNet's average training image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simco_jax import cli, streaming  # noqa: E402

CROP = 224
GPU_IMAGES_PER_S = 3000


def generate_jpegs(directory: str, count: int, seed: int = 0) -> list[str]:
    """ImageNet-like JPEGs: 400×350, smooth content plus texture, ~110 KB at quality 90."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.uniform(0, 255, (8, 9, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((400, 350), Image.BICUBIC), np.float32)
        texture = rng.normal(0, 58, base.shape)
        pixels = np.clip(base + texture, 0, 255).astype(np.uint8)
        path = os.path.join(directory, f"img_{i:04d}.JPEG")
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def list_jpegs(directory: str) -> list[str]:
    found = []
    for root, _, names in sorted(os.walk(directory)):
        found += [os.path.join(root, n) for n in sorted(names) if streaming._is_image(n)]
    return found


def _rates(iterator, count) -> tuple[float, float]:
    """(pairs per wall-clock second, pairs per CPU-second of this process, all threads).

    The second is the per-core figure that a loaded machine does not distort: CPU time is
    only counted while a thread of this process runs.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    done = sum(count(item) for item in iterator)
    return done / (time.perf_counter() - wall), done / (time.process_time() - cpu)


def grain_pairs_per_s(paths, threads: int, repeats: int):
    split = streaming.Split(
        "bench",
        len(paths),
        lambda i: (streaming.decode_rgb(paths[i]), 0),
        lambda i: paths[i],
    )
    files = streaming.UnreadableFiles(split, 1.0)
    n = len(paths) * repeats
    batch = 32

    def example(k):
        step, j = divmod(k, batch)
        return streaming.train_example(
            step,
            j,
            files=files,
            seed=0,
            global_batch=batch,
            shard=streaming.Sharding(0, 1),
            crop_size=CROP,
            scale=(0.08, 1.0),
        )

    n -= n % batch
    iterator = streaming.grain_batches(example, 0, n, batch, threads)
    next(iterator)  # warm-up: threads started, first batch decoded
    return _rates(iterator, lambda item: batch)


def tfdata_pairs_per_s(paths, threads: int, repeats: int):
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")

    def load(path, seed):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        shape = tf.shape(image)
        height, width = shape[0], shape[1]
        views = []
        for v in range(2):
            u = tf.random.stateless_uniform([4], seed=tf.stack([seed, tf.cast(v, tf.int64)]))
            scale = 0.08 + 0.92 * u[0]
            ratio = tf.exp(tf.math.log(3 / 4) + (tf.math.log(4 / 3) - tf.math.log(3 / 4)) * u[1])
            area = tf.cast(height * width, tf.float32) * scale
            w = tf.minimum(tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32), width)
            h = tf.minimum(tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32), height)
            top = tf.cast(u[2] * tf.cast(height - h + 1, tf.float32), tf.int32)
            left = tf.cast(u[3] * tf.cast(width - w + 1, tf.float32), tf.int32)
            crop = tf.image.crop_to_bounding_box(image, top, left, h, w)
            resized = tf.image.resize(crop, (CROP, CROP), "bilinear", antialias=True)
            views.append(tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8))
        return views[0], views[1]

    files = tf.data.Dataset.from_tensor_slices(paths * repeats)
    seeds = tf.data.Dataset.range(len(paths) * repeats)
    dataset = tf.data.Dataset.zip(files, seeds).map(load, num_parallel_calls=threads).batch(32)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    dataset = dataset.with_options(options).prefetch(2)
    iterator = iter(dataset)
    next(iterator)
    return _rates(iterator, lambda item: int(item[0].shape[0]))


def step_times(steps: int, rounds: int) -> dict:
    """Seconds per train step of the smoke SimCo run, resident vs streaming input.

    Both runs are built first, then timed in alternating rounds of `steps` steps each, so that a
    change in the machine's load hits both alike. Per step: the median wall-clock time (input
    wait + dispatch + step) and the CPU time of the whole process (all threads: the step's and
    the host pipeline's), which a loaded machine does not distort.
    """
    import jax

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
    from helpers import framework_config

    from simco_jax import inputs, parallel, train_step

    mesh = parallel.make_mesh()
    replicated = parallel.replicated(mesh)
    stop = np.int32(np.iinfo(np.int32).max)
    runs = {}
    for mode in ("resident", "streaming"):
        config = framework_config("simco", input_mode=mode, input_threads=1, max_epochs=10_000)
        data = inputs.create(config, mesh)
        steps_per_epoch = data.num_train // config.batch_size
        comps = train_step.build_components(config, data.num_classes, steps_per_epoch)
        state = jax.jit(
            lambda config=config, comps=comps, data=data: train_step.create_train_state(
                config, comps, data.image_shape
            ),
            out_shardings=replicated,
        )()
        chunk = jax.jit(
            train_step.make_train_chunk(
                config,
                comps,
                train_step.make_train_step(config, comps),
                chunk_size=1,
                select=data.train.select,
            ),
            in_shardings=(replicated, data.train.sharding, None),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        runs[mode] = dict(data=data, state=state, chunk=chunk, step=0, wall=[], cpu=[])

    def advance(run, count, record):
        for _ in range(count):
            wall, cpu = time.perf_counter(), time.process_time()
            run["state"], metrics = run["chunk"](
                run["state"], run["data"].train.batches(run["step"]), stop
            )
            jax.block_until_ready(metrics)
            run["step"] += 1
            if record:
                run["wall"].append(time.perf_counter() - wall)
                run["cpu"].append(time.process_time() - cpu)

    for run in runs.values():
        advance(run, 3, record=False)  # compilation and warm-up
    for _ in range(rounds):
        for run in runs.values():
            advance(run, steps, record=True)
    results = {}
    for mode, run in runs.items():
        run["data"].close()
        results[f"{mode}_wall_s"] = float(np.median(run["wall"]))
        results[f"{mode}_cpu_s"] = float(np.mean(run["cpu"]))
    results["streaming_over_resident_wall"] = (
        results["streaming_wall_s"] / results["resident_wall_s"]
    )
    results["streaming_over_resident_cpu"] = results["streaming_cpu_s"] / results["resident_cpu_s"]
    results["steps_timed_per_mode"] = steps * rounds
    return results


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image_dir", default="", help="real JPEGs to measure on (default: generated)")
    p.add_argument(
        "--num_images",
        type=int,
        default=0,
        help="images: generated (default 128), or the first found in --image_dir (default 1000)",
    )
    p.add_argument("--repeats", type=int, default=2, help="passes over the images per figure")
    p.add_argument("--steps", type=int, default=20, help="train steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per input mode")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.image_dir and not os.path.isdir(args.image_dir):
        cli.fail(f"--image_dir={args.image_dir!r} is not a directory")
    if min(args.num_images, args.repeats - 1, args.steps - 1, args.rounds - 1) < 0:
        cli.fail("--num_images must be >= 0, and --repeats, --steps, --rounds >= 1")

    with tempfile.TemporaryDirectory() as scratch:
        paths = (
            list_jpegs(args.image_dir)[: args.num_images or 1000]
            if args.image_dir
            else generate_jpegs(scratch, args.num_images or 128)
        )
        sizes = [os.path.getsize(x) for x in paths]
        with Image.open(paths[0]) as first:
            shape = first.size
        report = {
            "images": len(paths),
            "mean_kb": float(np.mean(sizes) / 1024),
            "first_size_wh": shape,
            "source": args.image_dir or "generated",
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        }
        print(json.dumps(report), flush=True)
        for name, measure in (("grain_pil", grain_pairs_per_s), ("tfdata", tfdata_pairs_per_s)):
            for threads in (1, 2):
                wall, per_cpu_s = measure(paths, threads, args.repeats)
                report[f"{name}_{threads}_threads"] = dict(
                    pairs_per_s=wall, pairs_per_cpu_s=per_cpu_s
                )
                print(
                    f"{name}, {threads} thread(s): {wall:.1f} pairs/s wall, "
                    f"{per_cpu_s:.1f} pairs per CPU-second",
                    flush=True,
                )
            per_core = report[f"{name}_1_threads"]["pairs_per_cpu_s"]
            report[f"{name}_cores_for_{GPU_IMAGES_PER_S}_img_s"] = GPU_IMAGES_PER_S / per_core
    report["step_s"] = step_times(args.steps, args.rounds)
    print(json.dumps(report["step_s"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
