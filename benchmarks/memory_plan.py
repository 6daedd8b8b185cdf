r"""Memory and FLOPs of the ImageNet train step per device, from XLA's compiled executable.

For each framework this lowers and compiles (never runs) the trainer's jitted train step
(`train_step.make_train_step`, state donated, as train.py) for ONE device at a few tiny per-device
batches, on abstract inputs (nothing is allocated), and reads

* memory: the compiled program's arguments + outputs + temporaries − donated aliases
  (`compiled.memory_analysis()`), i.e. what the step needs on the device;
* FLOPs per step: XLA's cost analysis of the same executable.

Both are linear in the per-device batch b (activations and FLOPs scale with b; the state —
parameters, momentum encoder, SGD momentum, queue — does not), so a least-squares line through
the tiny batches gives bytes(b) = fixed + b · per_image, which the script evaluates at 32, 64 and
128 and prints beside the analytic estimate of `simco_jax.memory` (the model train.py checks
before compiling). Under data parallelism a device holds the replicated state and its own b
images, so this is the per-device need of a run with global batch b × devices (collectives add
buffers of gradient size at most).

The numbers come from the backend the script runs on. On CPU, XLA's buffer assignment differs
from a GPU's or TPU's (other fusions, no cuDNN workspaces), so treat CPU figures as an estimate of
the accelerator's; run the script on the accelerator for its own numbers.

    python benchmarks/memory_plan.py --frameworks=simco,simmoco,mocov2 --batches=2,4 \
        --json=runs/memory_plan.json
    # the same on a GPU/TPU host, with real batch sizes (no extrapolation needed):
    python benchmarks/memory_plan.py --batches=32,64,128
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from simco_jax import cli, memory, train_step  # noqa: E402
from simco_jax import config as config_lib  # noqa: E402

NUM_CLASSES = 1000
TARGET_BATCHES = (32, 64, 128)


def load_config(framework: str, variant: str | None):
    path = os.path.join(REPO, "configs", f"{framework}_imagenet.py")
    if not os.path.isfile(path):
        raise config_lib.ConfigError(f"--frameworks: no configs/{framework}_imagenet.py")
    spec = importlib.util.spec_from_file_location(f"{framework}_imagenet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def compile_step(config, per_device_batch: int):
    """The train step compiled for one device at `per_device_batch`, on abstract inputs."""
    config = config.copy_and_resolve_references()
    config.batch_size = per_device_batch
    if config.queue_size:
        # The queue must hold whole batches; its size (hence its memory) stays the recipe's.
        config.queue_size -= config.queue_size % per_device_batch
    comps = train_step.build_components(config, NUM_CLASSES, 1000)
    image_shape = (config.crop_size, config.crop_size, 3)
    state = jax.eval_shape(lambda: train_step.create_train_state(config, comps, image_shape))
    images = jax.ShapeDtypeStruct((per_device_batch, *image_shape), jnp.uint8)
    labels = jax.ShapeDtypeStruct((per_device_batch,), jnp.int32)
    step = jax.jit(train_step.make_train_step(config, comps), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, images, labels).compile()
    return compiled, time.perf_counter() - start, config


def measure(compiled) -> dict:
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0]
    return dict(
        argument_bytes=int(m.argument_size_in_bytes),
        output_bytes=int(m.output_size_in_bytes),
        alias_bytes=int(m.alias_size_in_bytes),
        temp_bytes=int(m.temp_size_in_bytes),
        program_bytes=int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        ),
        flops=float(cost["flops"]),
    )


def fit_line(batches, values):
    """Least-squares (intercept, slope) of values over batches."""
    slope, intercept = np.polyfit(np.asarray(batches, float), np.asarray(values, float), 1)
    return float(intercept), float(slope)


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frameworks", type=cli.comma_list(), default="simco,simmoco,mocov2")
    parser.add_argument("--variant", default=None, help="config variant, e.g. imagenet100")
    parser.add_argument(
        "--batches", type=cli.comma_list(int), default="2,4", help="per-device batches to compile"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    batches = args.batches
    try:  # every framework's config, before anything compiles
        configs = {framework: load_config(framework, args.variant) for framework in args.frameworks}
    except config_lib.ConfigError as error:
        cli.fail(str(error))
    device = jax.devices()[0]
    report = dict(
        backend=jax.default_backend(),
        device_kind=device.device_kind,
        jax=jax.__version__,
        dtype=args.dtype,
        batches=batches,
        frameworks={},
    )
    for framework, config in configs.items():
        config.dtype = args.dtype
        rows = []
        for b in batches:
            compiled, seconds, used = compile_step(config, b)
            row = dict(per_device_batch=b, compile_s=seconds, queue_size=used.queue_size)
            row.update(measure(compiled))
            rows.append(row)
            print(
                f"{framework} b={b}: {row['program_bytes'] / 2**20:.0f} MiB "
                f"(temp {row['temp_bytes'] / 2**20:.0f} MiB), "
                f"{row['flops'] / 1e9:.1f} GFLOP/step, compiled in {seconds:.0f} s",
                flush=True,
            )
        result = dict(rows=rows)
        if len(batches) > 1:
            fixed, per_image = fit_line(batches, [r["program_bytes"] for r in rows])
            flops_fixed, flops_per_image = fit_line(batches, [r["flops"] for r in rows])
            result.update(
                fixed_bytes=fixed,
                bytes_per_image=per_image,
                flops_per_image=flops_per_image,
                flops_fixed=flops_fixed,
                extrapolated={
                    b: dict(
                        program_gib=(fixed + b * per_image) / 2**30,
                        gflop_per_step=(flops_fixed + b * flops_per_image) / 1e9,
                    )
                    for b in TARGET_BATCHES
                },
            )
        config.batch_size = TARGET_BATCHES[0]
        result["analytic_gib"] = {
            b: memory.step_bytes(config, NUM_CLASSES, b) / 2**30 for b in TARGET_BATCHES
        }
        report["frameworks"][framework] = result
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    print(format_table(report))


def format_table(report) -> str:
    lines = [
        f"{report['backend']} ({report['device_kind']}), {report['dtype']}, compiled at "
        f"per-device batches {report['batches']}, extrapolated linearly:",
        f"{'framework':<9} {'b':>4} {'compiled GiB':>12} {'analytic GiB':>12} {'GFLOP/step':>10}",
    ]
    for framework, result in report["frameworks"].items():
        for b in TARGET_BATCHES:
            measured = result.get("extrapolated", {}).get(b)
            gib = f"{measured['program_gib']:.2f}" if measured else "n/a"
            gflop = f"{measured['gflop_per_step']:.0f}" if measured else "n/a"
            lines.append(
                f"{framework:<9} {b:>4} {gib:>12} {result['analytic_gib'][b]:>12.2f} {gflop:>10}"
            )
        if "flops_per_image" in result:
            lines.append(
                f"{framework:<9} per image: {result['bytes_per_image'] / 2**20:.1f} MiB, "
                f"{result['flops_per_image'] / 1e9:.2f} GFLOP; fixed "
                f"{result['fixed_bytes'] / 2**20:.0f} MiB"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
