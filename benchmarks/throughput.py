r"""Training throughput of the real jitted train chunk, and of the bare passes it must do.

For each row (framework × batch size × queue size) this builds the state and the jitted chunk the
trainer runs (`train_step.make_train_chunk`, donated state, the dataset resident on the device as
a synthetic uint8 array of CIFAR shape) and measures:

* compile time (lowering + XLA compilation of the chunk),
* steady-state step time and images/s (a pair of views counts as one image),
* memory: the compiled program's own (arguments + outputs + temporaries − aliased) and the
  process's peak (device `memory_stats()`; on CPU the peak resident set size),
* model-FLOPs utilisation: FLOPs per step from XLA's cost analysis of the compiled chunk ÷ step
  time ÷ the device's peak FLOP/s (table below, or --peak_flops),
* with --baseline: the same for bare jitted forward/backward steps of the same encoder on
  pre-augmented float inputs — two online forward passes per step with the backward passes the loss
  needs (the method's `backward_views`: view 1 alone for a one-way loss with momentum keys or
  stop-gradient targets, else both), plus the momentum encoder's forward passes where the framework
  has one (one per view, as the full step and the official code do) — and the ratio full step /
  bare step.

CPU (ResNet-18 at batch 64; the script prints its own timing):

    python benchmarks/throughput.py --frameworks=simco,simmoco,mocov2 --batch_sizes=64 \
        --queue_sizes=4096,65536 --width=64 --chunks=3 --baseline=all \
        --json=runs/throughput_cpu.json

GPU (see benchmarks/device_run.sh): --rows=simco:256,mocov2:256:65536 --width=64 --dtype=auto.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from simco_jax import cli, inputs, parallel, train_step  # noqa: E402
from simco_jax import config as config_lib  # noqa: E402

# Dense peak FLOP/s per chip (vendor datasheets, no sparsity). 'float32' is what float32 matmuls
# run at under XLA's default precision: TF32 tensor cores on NVIDIA, bf16 passes on TPU.
# The first entry whose key occurs in `device_kind` wins, so specific names come first.
PEAK_FLOPS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494e12}),  # SXM
    ("H200", {"bfloat16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),  # v5e
    ("TPU v5e", {"bfloat16": 197e12, "float32": 197e12}),
)

FRAMEWORK_CONFIGS = {
    "simco": "configs/simco_cifar.py",
    "simmoco": "configs/simmoco_cifar.py",
    "mocov2": "configs/mocov2_cifar.py",
}
NUM_CLASSES = 100  # CIFAR-100's probe


# ------------------------------------------------------------------------------------ config


def load_config(path: str, variant: str | None, overrides: dict):
    """`get_config(variant)` of a config file, then `overrides` (key -> value)."""
    if not os.path.isfile(os.path.join(REPO, path)):
        known = ", ".join(FRAMEWORK_CONFIGS)
        raise config_lib.ConfigError(f"{path!r} is neither a framework ({known}) nor a config file")
    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    for key, value in overrides.items():
        if key not in config:
            message = config_lib.unknown_keys_message([key], config.keys(), flag="--set ")
            raise config_lib.ConfigError(message)
        try:
            config[key] = value
        except TypeError:  # ml_collections keeps each key's type
            message = f"--set {key}={value!r}: the config's {key} is {config[key]!r}"
            raise config_lib.ConfigError(f"{message}, of another type") from None
    return config


def parse_overrides(items) -> dict:
    """['key=value', ...] -> {key: value}; values are Python literals, else strings."""
    result = {}
    for item in items or ():
        key, equals, text = item.partition("=")
        if not key or not equals:
            raise config_lib.ConfigError(f"--set {item!r}: write --set KEY=VALUE")
        try:
            result[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            result[key] = text
    return result


def parse_rows(args) -> list[tuple[str, int, int | None]]:
    """(framework, batch, queue) rows: --rows if given, else the cross product.

    The queue sizes apply to frameworks whose config has a queue (MoCo v2); the others keep
    their in-batch negatives. queue None = the framework's own setting.
    """
    if args.rows:
        rows = []
        for spec in args.rows.split(","):
            parts = spec.split(":")
            if len(parts) not in (2, 3):
                raise config_lib.ConfigError(f"--rows: {spec!r} is not framework:batch[:queue]")
            numbers = _ints(":".join(parts[1:]).replace(":", ","), "--rows " + spec)
            rows.append((parts[0], numbers[0], numbers[1] if len(numbers) > 1 else None))
        return rows
    rows = []
    for framework in args.frameworks.split(","):
        if framework not in FRAMEWORK_CONFIGS:
            known = ", ".join(FRAMEWORK_CONFIGS)
            raise config_lib.ConfigError(f"--frameworks: unknown {framework!r}; known: {known}")
        has_queue = load_config(FRAMEWORK_CONFIGS[framework], None, {}).queue_size > 0
        queues = _ints(args.queue_sizes, "--queue_sizes") if has_queue else [None]
        for batch in _ints(args.batch_sizes, "--batch_sizes"):
            rows.extend((framework, batch, q) for q in queues)
    return rows


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise config_lib.ConfigError(f"{flag}={text!r}: not comma-separated integers") from None


def checked_rows(args) -> list[tuple[str, int, int | None]]:
    """The rows, each row's config built and checked before the device is touched: a bad
    argument is one line, not a row error after minutes of compiling the others."""
    rows = parse_rows(args)
    if args.baseline not in ("all", "none"):
        _ints(args.baseline, "--baseline")
    for row in rows:
        row_config(args, *row)
    return rows


# ------------------------------------------------------------------------------------ device


def device_info() -> dict:
    device = jax.devices()[0]
    return dict(
        platform=device.platform,
        device_kind=device.device_kind,
        num_devices=jax.device_count(),
        host_cpus=os.cpu_count(),
        host=platform.node(),
    )


def peak_flops_of(device_kind: str, dtype_name: str, override: float | None) -> float | None:
    if override:
        return override
    for name, peaks in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return peaks["bfloat16" if dtype_name == "bfloat16" else "float32"]
    return None  # CPU and unknown chips: MFU n/a unless --peak_flops


def peak_memory_bytes() -> tuple[int | None, str]:
    """The process's peak device memory so far, or on CPU its peak resident set size."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "host peak RSS (VmHWM)"
    except OSError:
        pass
    return None, "n/a"


def program_bytes(compiled) -> int | None:
    """What the compiled program needs on the device: arguments, outputs and temporaries."""
    try:
        m = compiled.memory_analysis()
        return int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


_SCAN_COUNTS_TRIPS = None


def cost_analysis_counts_scan_trips() -> bool:
    """Whether XLA's cost analysis multiplies a loop body by its trip count (backend-specific).

    Measured on a tiny scan of length 1 and 4, so FLOPs per step come out right either way.
    """
    global _SCAN_COUNTS_TRIPS
    if _SCAN_COUNTS_TRIPS is None:
        x = jnp.ones((64, 64), jnp.float32)

        def scanned(length):
            body = lambda w, _: (jnp.tanh(x @ w), None)
            return lambda w: jax.lax.scan(body, w, None, length=length)[0]

        one, four = (_cost_flops(jax.jit(scanned(n)).lower(x).compile()) for n in (1, 4))
        _SCAN_COUNTS_TRIPS = bool(one and four and four > 2 * one)
    return _SCAN_COUNTS_TRIPS


def flops_per_step(compiled, chunk_size: int) -> float | None:
    """A one-step chunk has no loop; a scan's body is counted once or per trip, by backend."""
    flops = _cost_flops(compiled)
    if flops is None or chunk_size == 1:
        return flops
    return flops / chunk_size if cost_analysis_counts_scan_trips() else flops


# ------------------------------------------------------------------------------------ timing


class Runner:
    """A compiled chunk and its (donated) carry; `run()` times one dispatch to completion."""

    def __init__(self, compiled, carry, args=(), *, compile_s: float, chunk_size: int):
        self.compiled, self.carry, self.args = compiled, carry, args
        self.compile_s, self.chunk_size = compile_s, chunk_size
        self.last_metrics = None

    def run(self) -> float:
        start = time.perf_counter()
        self.carry, self.last_metrics = self.compiled(self.carry, *self.args)
        jax.block_until_ready(self.carry)
        return time.perf_counter() - start

    def flops_per_step(self):
        return flops_per_step(self.compiled, self.chunk_size)

    def program_bytes(self):
        return program_bytes(self.compiled)


def build_full_step(config, images, labels, mesh) -> Runner:
    """The trainer's jitted chunk: same function, shardings and donation as train.py."""
    steps_per_epoch = images.shape[0] // config.batch_size
    comps = train_step.build_components(config, NUM_CLASSES, steps_per_epoch)
    replicated = parallel.replicated(mesh)
    state = jax.jit(
        lambda: train_step.create_train_state(config, comps, images.shape[1:]),
        out_shardings=replicated,
    )()
    chunk = jax.jit(
        train_step.make_train_chunk(
            config,
            comps,
            train_step.make_train_step(config, comps),
            chunk_size=train_step.steps_per_dispatch(config),
            select=lambda state, data, i: inputs.gather_batch(
                state,
                data,
                steps_per_epoch=steps_per_epoch,
                batch=config.batch_size,
                batch_sharding=parallel.batch_sharded(mesh),
            ),
        ),
        in_shardings=(replicated, replicated, None),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    stop_at = np.int32(np.iinfo(np.int32).max)  # every step of every chunk runs
    start = time.perf_counter()
    compiled = chunk.lower(state, (images, labels), stop_at).compile()
    compile_s = time.perf_counter() - start
    _progress(f"batch {config.batch_size}: full chunk compiled in {compile_s:.1f} s")
    return Runner(
        compiled,
        state,
        ((images, labels), stop_at),
        compile_s=compile_s,
        chunk_size=train_step.steps_per_dispatch(config),
    )


def make_bare_chunk(config, comps, chunk_size: int):
    """Bare forward/backward steps of the same encoder on pre-augmented float views.

    Per step: the online encoder's forward pass on each view (separate passes, as the full step)
    with the backward passes the method declares (`backward_views`), the momentum encoder's forward
    passes the full step does (stop-gradient, train-mode BatchNorm), and a plain SGD update so that
    no step is loop-invariant.
    No augmentation, optimizer state, probe, EMA, queue, data gather or contrastive loss.
    """
    model = comps.model
    momentum_passes = 2 if config.momentum_encoder else 0  # both views, as the full step

    def forward(params, stats, view):
        (_, projections), updates = model.apply(
            {"params": params, "batch_stats": stats}, view, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(jnp.square(projections.astype(jnp.float32))), updates["batch_stats"]

    # The views the method differentiates (`methods.Method.backward_views`, as the full step and
    # simco_jax/memory.py): a one-way loss with momentum keys (MoCo v2, SimMoCo) sends no gradient
    # through view 2's online pass; the pass itself still runs, for the BatchNorm statistics and
    # the probe's features.
    second_view_has_gradient = 1 in comps.method.backward_views

    def loss_fn(params, stats, views):
        loss1, stats = forward(params, stats, views[0])
        loss2, stats = forward(params, stats, views[1])
        if not second_view_has_gradient:
            loss2 = jax.lax.stop_gradient(loss2)
        return loss1 + loss2, stats

    def step(carry, _):
        params, stats, momentum_params, momentum_stats, views = carry
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, views)
        # The momentum encoder runs on last step's weights: other values than the online ones
        # (else XLA merges its pass with the online pass on the same view), changing every step.
        for view in (views[1], views[0])[:momentum_passes]:
            key_loss, momentum_stats = forward(momentum_params, momentum_stats, view)
            loss = loss + jax.lax.stop_gradient(key_loss)
        new_params = jax.tree.map(lambda p, g: p - 1e-4 * g.astype(p.dtype), params, grads)
        return (new_params, stats, params, momentum_stats, views), loss

    def chunk(carry):
        if chunk_size == 1:  # as the trainer on CPU: no loop around the step
            carry, loss = step(carry, None)
            return carry, loss[None]
        return jax.lax.scan(step, carry, None, length=chunk_size)

    return chunk


def build_bare_step(config, mesh) -> Runner:
    comps = train_step.build_components(config, NUM_CLASSES, 1)
    replicated = parallel.replicated(mesh)
    size = config.crop_size
    state = jax.jit(
        lambda: train_step.create_train_state(config, comps, (size, size, 3)),
        out_shardings=replicated,
    )()
    views = jax.device_put(
        jax.random.normal(jax.random.PRNGKey(0), (2, config.batch_size, size, size, 3)),
        replicated,
    )
    # Distinct buffers: the carry is donated, and one buffer cannot be donated twice.
    momentum_params, momentum_stats = jax.tree.map(jnp.copy, (state.params, state.batch_stats))
    carry = (state.params, state.batch_stats, momentum_params, momentum_stats, views)
    del state
    chunk = jax.jit(
        make_bare_chunk(config, comps, train_step.steps_per_dispatch(config)),
        in_shardings=(replicated,),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    start = time.perf_counter()
    compiled = chunk.lower(carry).compile()
    compile_s = time.perf_counter() - start
    _progress(f"batch {config.batch_size}: bare chunk compiled in {compile_s:.1f} s")
    return Runner(
        compiled, carry, compile_s=compile_s, chunk_size=train_step.steps_per_dispatch(config)
    )


def measure(runners: dict, *, warmup: int, chunks: int) -> dict:
    """Per-step seconds of each runner: median and minimum over `chunks` timed dispatches.

    The runners take turns chunk by chunk, so a burst of load from other processes hits them
    alike and their ratio stays meaningful on a shared machine.
    """
    for name, runner in runners.items():
        start = time.perf_counter()
        for _ in range(warmup):
            runner.run()
        _progress(f"{name} warm-up: {time.perf_counter() - start:.1f} s")
    times = {name: [] for name in runners}
    for _ in range(chunks):
        for name, runner in runners.items():
            times[name].append(runner.run() / runner.chunk_size)
    return {
        name: dict(median=float(np.median(t)), min=float(np.min(t)), all=t)
        for name, t in times.items()
    }


# ------------------------------------------------------------------------------------ main


def row_config(args, framework: str, batch: int, queue: int | None):
    overrides = dict(parse_overrides(args.set))
    overrides.update(
        dataset="synthetic",  # nothing is loaded: the benchmark makes its own device array
        batch_size=batch,
        backbone=args.backbone,
        backbone_width=args.width,
        crop_size=args.image_size,
        dtype=args.dtype,
        steps_per_dispatch=args.steps_per_dispatch,
    )
    if queue is not None:
        overrides["queue_size"] = queue
    config = load_config(FRAMEWORK_CONFIGS.get(framework, framework), args.variant, overrides)
    config_lib.validate(config, num_devices=jax.device_count())
    return config


def want_baseline(args, batch: int) -> bool:
    if args.baseline in ("all", "none"):
        return args.baseline == "all"
    return batch in {int(b) for b in args.baseline.split(",")}


def format_table(rows: list[dict]) -> str:
    def mib(x):
        return f"{x / 2**20:.0f}" if x else "n/a"

    def pct(x):
        return f"{100 * x:.1f}%" if x is not None else "n/a"

    header = (
        f"{'framework':<9} {'batch':>5} {'queue':>6} {'dtype':<8} {'width':>5} {'compile_s':>9} "
        f"{'step_ms':>9} {'img/s':>9} {'prog_MiB':>8} {'peak_MiB':>8} {'GFLOP/st':>9} "
        f"{'MFU':>6} {'bare_ms':>9} {'full/bare':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['framework']:<9} {r['batch_size']:>5} error: {r['error']}")
            continue
        flops = r["flops_per_step"]
        bare = r.get("bare_step_s")
        ratio = f"{r['full_over_bare']:.3f}" if bare else "-"
        lines.append(
            f"{r['framework']:<9} {r['batch_size']:>5} {r['queue_size']:>6} {r['dtype']:<8} "
            f"{r['width']:>5} {r['compile_s']:>9.1f} {1e3 * r['step_s']:>9.2f} "
            f"{r['images_per_s']:>9.1f} {mib(r['program_bytes']):>8} "
            f"{mib(r['peak_memory_bytes']):>8} "
            f"{(flops / 1e9 if flops else float('nan')):>9.1f} {pct(r['mfu']):>6} "
            f"{(f'{1e3 * bare:.2f}' if bare else '-'):>9} {ratio:>9}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--frameworks", default="simco,simmoco,mocov2")
    p.add_argument("--batch_sizes", default="64,128,256,512,1024")
    p.add_argument("--queue_sizes", default="4096,16384,65536", help="for frameworks with a queue")
    p.add_argument("--rows", default="", help="framework:batch[:queue],... instead of the sweep")
    p.add_argument("--variant", default=None, help="get_config argument, e.g. cifar10")
    p.add_argument("--set", action="append", help="config override key=value (repeatable)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=int, default=64, help="backbone_width (64 = ResNet-18)")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--num_train", type=int, default=50000, help="synthetic images on the device")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--steps_per_dispatch", type=int, default=8)
    p.add_argument("--warmup_chunks", type=int, default=1)
    p.add_argument("--chunks", type=int, default=5, help="timed dispatches per row")
    p.add_argument("--baseline", default="all", help="all | none | batch sizes, e.g. 256")
    p.add_argument("--peak_flops", type=float, default=None, help="device peak FLOP/s for MFU")
    p.add_argument("--json", default="", help="write the results here (after every row)")
    args = p.parse_args(argv)
    try:
        rows = checked_rows(args)
    except config_lib.ConfigError as error:
        cli.fail(str(error))

    mesh = parallel.make_mesh()
    info = device_info()
    dtype_name = jnp.dtype(train_step.resolve_dtype(args.dtype)).name
    peak = peak_flops_of(info["device_kind"], dtype_name, args.peak_flops)
    rng = np.random.default_rng(0)
    images, labels = parallel.put_replicated(
        (
            rng.integers(0, 256, (args.num_train, args.image_size, args.image_size, 3), np.uint8),
            rng.integers(0, NUM_CLASSES, (args.num_train,), np.int32),
        ),
        mesh,
    )
    import flax
    import optax

    report = dict(
        device=info,
        dtype=dtype_name,
        peak_flops=peak,
        versions=dict(
            jax=jax.__version__,
            jaxlib=_jaxlib_version(),
            flax=flax.__version__,
            optax=optax.__version__,
            python=platform.python_version(),
        ),
        settings=vars(args),
        command=" ".join([os.path.relpath(sys.argv[0], REPO), *(argv or sys.argv[1:])]),
        rows=[],
    )
    print(
        f"device: {info['device_kind']} ×{info['num_devices']} ({info['platform']}), "
        f"dtype {dtype_name}, jax {jax.__version__}, peak FLOP/s {peak or 'n/a'}",
        flush=True,
    )
    for framework, batch, queue in rows:
        row = dict(framework=framework, batch_size=batch, width=args.width, dtype=dtype_name)
        try:
            config = row_config(args, framework, batch, queue)
            row.update(
                queue_size=config.queue_size,
                image_size=config.crop_size,
                steps_per_dispatch=train_step.steps_per_dispatch(config),
            )
            runners = {"full": build_full_step(config, images, labels, mesh)}
            if want_baseline(args, batch):
                runners["bare"] = build_bare_step(config, mesh)
            timing = measure(runners, warmup=args.warmup_chunks, chunks=args.chunks)
            full = runners["full"]
            row.update(
                compile_s=full.compile_s,
                step_s=timing["full"]["median"],
                step_s_min=timing["full"]["min"],
                step_s_all=timing["full"]["all"],
                flops_per_step=full.flops_per_step(),
                program_bytes=full.program_bytes(),
                last_loss=float(np.asarray(full.last_metrics["loss"])[-1]),
            )
            row["images_per_s"] = batch / row["step_s"]
            row["mfu"] = (
                row["flops_per_step"] / row["step_s"] / peak
                if peak and row["flops_per_step"]
                else None
            )
            if "bare" in runners:
                bare = runners["bare"]
                row.update(
                    bare_compile_s=bare.compile_s,
                    bare_step_s=timing["bare"]["median"],
                    bare_step_s_min=timing["bare"]["min"],
                    bare_step_s_all=timing["bare"]["all"],
                    bare_flops_per_step=bare.flops_per_step(),
                    full_over_bare=timing["full"]["median"] / timing["bare"]["median"],
                    full_over_bare_min=timing["full"]["min"] / timing["bare"]["min"],
                )
            del runners, full
            row["peak_memory_bytes"], row["peak_memory_kind"] = peak_memory_bytes()
        except Exception as error:  # noqa: BLE001 - one failed row (e.g. OOM) keeps the table
            row["error"] = _describe(error)
        report["rows"].append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    print()
    print(format_table(report["rows"]))
    print(f"memory: prog = compiled chunk (args+outputs+temps); peak = {peak_memory_bytes()[1]}")
    return 1 if any("error" in r for r in report["rows"]) else 0


def _progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
