"""Grid sweeps: one ordinary, resumable training run per grid point, then one results table.

    python -m simco_jax.sweep --sweep=sweeps/batch_size.py --workdir=runs/sweep_bs [--variant=smoke]

A sweep file defines `get_sweep(variant=None)` returning a dict:

    base:      a config file (e.g. "configs/simco_cifar.py"), loaded with get_config(variant)
    grid:      {config key: [values]}; the special key `framework` ('simco' | 'simmoco' |
               'mocov2' | 'byol' | 'simsiam') picks configs/<framework>_cifar.py for that point
               instead of `base`
    overrides: optional {key: value} applied to every point before the grid values
    tied:      optional {key: other key}: key takes other key's value (e.g. a constant momentum:
               final_tau_momentum follows base_tau_momentum)
    pack:      optional bool (or --pack): points that differ only in `config.MEMBER_KEYS` (seed,
               temperature, dt_m, lr, ...) train as the members of one population run
               (docs/population.md), in ROOT/population[,<shared grid values>]; the others alone

Every point's config is built and checked before the first point trains: a missing sweep file,
an unknown variant, grid key or framework, a value of the wrong type or an empty grid is one line
`error: ...` and exit 2. Each point trains in ROOT/<key=value,...> (rerunning the command resumes
interrupted points and skips finished ones: those with a `sweep_point.json`). The table
(ROOT/results.csv and ROOT/results.md) has one row per point: the grid values, the final
online-probe top-1/top-5, the last kNN top-1, the steps trained, the wall time of the call that
finished the point, and the hardware; where the grid varies `seed`, a row per setting of the
other keys gives each accuracy's mean ± std over the seeds. `PUBLISHED` holds the official
repository's batch-size table for plots beside it.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import itertools
import json
import logging
import math
import os
import shlex
import sys
import time

import jax
import ml_collections

from simco_jax import (
    checkpointing,
    cli,
    data,
    domains,
    loop,
    parallel,
    progress,
    train,
    workdir,
    writers,
)
from simco_jax import config as config_lib

# Named, not __name__: under `python -m simco_jax.sweep` that is '__main__', outside the
# 'simco_jax' logger whose level main() (and launch.py) set to INFO, so nothing would show.
log = logging.getLogger("simco_jax.sweep")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The official README (github.com/ChaoningZhang/Dual-temperature): CIFAR-100, ResNet-18, 200
# epochs, online linear probe top-1 %.
PUBLISHED = {
    "mocov2": {64: 52.58, 128: 54.40, 256: 53.28, 512: 51.47, 1024: 48.90},
    "simmoco": {64: 54.02, 128: 54.93, 256: 54.11, 512: 52.45, 1024: 49.70},
    "simco": {64: 58.04, 128: 58.29, 256: 58.35, 512: 57.08, 1024: 55.34},
}
PUBLISHED_SOURCE = "official README, CIFAR-100, ResNet-18, 200 epochs, top-1 %"

METRIC_COLUMNS = ("probe_top1", "probe_top5", "knn_top1", "steps", "wall_s", "device")
DONE_FILE = "sweep_point.json"
DEFAULT_BASE = "configs/simco_cifar.py"
# What a user can cause and fix: one line and exit 2 (as launch.py's).
EXPECTED_ERRORS = (
    config_lib.ConfigError,
    data.DataError,
    checkpointing.CheckpointError,
    checkpointing.CheckpointSaveError,
    loop.NonFiniteLossError,
    workdir.WorkdirLockError,
)


def load_module(path: str):
    """A Python file as a module; relative paths resolve from the cwd, then the repository."""
    candidates = [path, os.path.join(REPO, path)]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise config_lib.ConfigError(f"{path} is not a file (looked in {os.getcwd()} and {REPO})")
    name = "_simco_file_" + os.path.splitext(os.path.basename(found))[0]
    spec = importlib.util.spec_from_file_location(name, found)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SWEEP_KEYS = ("base", "grid", "overrides", "tied", "pack")


def frameworks() -> list[str]:
    """The `framework` grid values: configs/<framework>_cifar.py."""
    paths = glob.glob(os.path.join(REPO, "configs", "*_cifar.py"))
    return sorted(os.path.basename(p)[: -len("_cifar.py")] for p in paths)


def load_sweep(path: str, variant: str | None = None) -> dict:
    """The sweep file's dict, its shape checked (one-line ConfigErrors); its points' configs
    are checked by `point_configs`."""
    module = load_module(path)
    if not callable(getattr(module, "get_sweep", None)):
        raise config_lib.ConfigError(f"{path} defines no get_sweep(variant=None)")
    sweep = module.get_sweep(variant)
    if not isinstance(sweep, dict):
        raise config_lib.ConfigError(f"{path}: get_sweep() must return a dict, got {sweep!r}")
    unknown = [key for key in sweep if key not in SWEEP_KEYS]
    if unknown:
        raise config_lib.ConfigError(
            f"{path}: {config_lib.unknown_keys_message(unknown, SWEEP_KEYS, noun='sweep key')}"
        )
    grid = sweep.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise config_lib.ConfigError(f"{path}: 'grid' must be a non-empty dict, got {grid!r}")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise config_lib.ConfigError(
                f"{path}: grid[{key!r}] must be a non-empty list of values, got {values!r}"
            )
    for key in ("overrides", "tied"):
        if not isinstance(sweep.get(key) or {}, dict):
            raise config_lib.ConfigError(f"{path}: {key!r} must be a dict, got {sweep[key]!r}")
    unknown = sorted({str(f) for f in grid.get("framework", ())} - set(frameworks()))
    if unknown:
        raise config_lib.ConfigError(
            f"{path}: unknown framework {unknown[0]!r}; known: {', '.join(frameworks())}"
        )
    return sweep


def grid_points(grid: dict) -> list[dict]:
    """The cartesian product of the grid, in the order the grid lists its keys and values."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def point_name(point: dict) -> str:
    """'batch_size=64,queue_size=0': the point's workdir name."""
    return ",".join(f"{key}={_format(value)}" for key, value in point.items())


def _format(value) -> str:
    return str(value)


def point_config(base, point: dict, *, variant=None, overrides=None, tied=None):
    """The point's config: base (a ConfigDict or a config file), overrides, grid values, ties.

    A value of the wrong type, or a key the config does not have, is a one-line ConfigError;
    a period given in one spelling replaces the base's other one (as on launch.py's line)."""
    point = dict(point)
    framework = point.pop("framework", None)
    if framework is not None:
        base = f"configs/{framework}_cifar.py"
    if isinstance(base, str):
        config = load_module(base).get_config(variant)
    else:
        config = ml_collections.ConfigDict(base.to_dict())
    values = {**(overrides or {}), **point}
    tied = tied or {}
    unknown = [key for key in [*values, *tied, *tied.values()] if key not in config]
    if unknown:
        raise config_lib.ConfigError(
            config_lib.unknown_keys_message(unknown, config.keys())
            + f"; the keys: {domains.keys_location()}"
        )
    for key, value in values.items():
        try:
            config[key] = value
        except TypeError:  # ml_collections keeps each key's type
            domain = config_lib.DOMAINS.get(key)
            expected = domain.text if domain else f"of the type of {config[key]!r}"
            raise config_lib.ConfigError(f"{key} must be {expected}, got {value!r}") from None
    for key, source in tied.items():
        config[key] = config[source]
    config_lib.prefer_given_periods(config, set(values))
    return config


def point_configs(sweep: dict, variant: str | None, *, num_devices=None) -> list:
    """Every point's config, each checked, before any point trains: (point, config) pairs."""
    configs = []
    for point in grid_points(sweep["grid"]):
        try:
            config = point_config(
                sweep.get("base", DEFAULT_BASE),
                point,
                variant=variant,
                overrides=sweep.get("overrides"),
                tied=sweep.get("tied"),
            )
            config_lib.validate(config, num_devices=num_devices)
        except config_lib.ConfigError as error:
            raise config_lib.ConfigError(f"point {point_name(point)}: {error}") from None
        configs.append((point, config))
    return configs


def _device_description() -> str:
    device = jax.devices()[0]
    return f"{jax.device_count()}x {getattr(device, 'device_kind', device.platform)}"


def run_point(config, workdir: str, point: dict) -> dict:
    """Trains (or resumes) one point; marks it finished unless the run was preempted."""
    start = time.perf_counter()
    summary = train.train_and_evaluate(config, workdir)
    if summary.get("preempted"):
        return {"preempted": True}
    record = {
        "point": point,
        "steps": int(summary["step"]),
        "wall_s": time.perf_counter() - start,
        "device": _device_description(),
    }
    with open(os.path.join(workdir, DONE_FILE), "w") as f:
        json.dump(record, f, indent=2)
    return record


def point_results(workdir: str, suffix: str = "") -> dict:
    """The table's metrics of one point from its metrics.jsonl and sweep_point.json; `suffix`:
    the point's member in a packed population run ('_m1': its metrics are `probe_top1_m1`)."""
    row = dict.fromkeys(METRIC_COLUMNS, "")
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return row
    records = writers.read_metrics(workdir)
    for key in ("probe_top1", "probe_top5", "knn_top1"):
        values = [r[key + suffix] for r in records if key + suffix in r]
        row[key] = round(values[-1], 2) if values else ""
    row["steps"] = max((r["step"] for r in records), default="")
    done_path = os.path.join(workdir, DONE_FILE)
    if os.path.exists(done_path):
        with open(done_path) as f:
            done = json.load(f)
        row.update(steps=done["steps"], wall_s=round(done["wall_s"], 1), device=done["device"])
    return row


def write_tables(root: str, grid: dict, *, command: str = "", locations=None) -> list[dict]:
    """ROOT/results.csv and ROOT/results.md from every point's workdir (`locations`: point name
    -> (workdir name, member suffix) of the packed points); returns the rows. Where the grid
    varies `seed`, a row per setting of the other keys follows with the mean ± std over seeds."""
    rows = []
    for point in grid_points(grid):
        where, suffix = (locations or {}).get(point_name(point), (point_name(point), ""))
        results = point_results(os.path.join(root, where), suffix)
        rows.append({**{k: _format(v) for k, v in point.items()}, **results})
    rows += seed_statistics(grid, rows)
    columns = [*grid, *METRIC_COLUMNS]
    with open(os.path.join(root, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    if command:
        lines += [f"Produced by `{command}`.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


SEED_STATISTICS = ("probe_top1", "probe_top5", "knn_top1")


def seed_statistics(grid: dict, rows: list[dict]) -> list[dict]:
    """One row per setting of the grid's other keys: the mean ± standard deviation (n - 1)
    over its seeds of each accuracy; none unless the grid varies `seed`."""
    if len(grid.get("seed", ())) < 2:
        return []
    others = [k for k in grid if k != "seed"]
    settings = {}
    for row in rows:
        settings.setdefault(tuple(row[k] for k in others), []).append(row)
    summary = []
    for setting, group in settings.items():
        row = dict.fromkeys([*grid, *METRIC_COLUMNS], "")
        row.update(dict(zip(others, setting, strict=True)), seed="mean ± std")
        for key in SEED_STATISTICS:
            values = [r[key] for r in group if r[key] != ""]
            if len(values) > 1:
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                row[key] = f"{mean:.2f} ± {std:.2f}"
        summary.append(row)
    return summary


# ------------------------------------------------------------------------ packing into members


def packs(configs: list, cap: int | None = None) -> list[tuple[list[int], object]]:
    """The points that can share one program, as (point indices, population config) pairs, the
    indices in the order of the population's members; the rest alone, as ([index], None).

    Points pack when their configs differ only in `config.MEMBER_KEYS` and their values of
    those keys form a grid (`config.members` trains a grid): the population's members are then
    exactly the points' configs. A group of more than `cap` members (the memory check's
    largest population) trains as separate runs."""
    groups = {}
    for index, (_, config) in enumerate(configs):
        if len(config.members):  # a point that is a population already
            groups[("alone", index)] = [index]
            continue
        shared = {k: v for k, v in config.to_dict().items() if k not in config_lib.MEMBER_KEYS}
        groups.setdefault(json.dumps(shared, sort_keys=True, default=str), []).append(index)
    result = []
    for indices in groups.values():
        packed = _population_of([configs[i][1] for i in indices])
        if packed is None or len(indices) < 2 or (cap is not None and len(indices) > cap):
            result += [([i], None) for i in indices]
        else:
            population, order = packed
            result.append(([indices[j] for j in order], population))
    return sorted(result, key=lambda pack: min(pack[0]))


def _population_of(configs: list):
    """(the config whose members are `configs`, the index in `configs` of each member), or
    None when they are not a grid."""
    varying = [
        key for key in config_lib.MEMBER_KEYS if len({json.dumps(c[key]) for c in configs}) > 1
    ]
    population = configs[0].copy_and_resolve_references()
    population.members = {key: list(dict.fromkeys(c[key] for c in configs)) for key in varying}
    wanted = [json.dumps(c.to_dict(), sort_keys=True) for c in configs]
    members = [
        json.dumps(m.to_dict(), sort_keys=True) for m in config_lib.member_configs(population)
    ]
    if sorted(members) != sorted(wanted) or len(set(wanted)) != len(wanted):
        return None
    return population, [wanted.index(m) for m in members]


def pack_name(points: list[dict]) -> str:
    """'population' and the grid values its points share: its workdir's name."""
    shared = {k: v for k, v in points[0].items() if all(p[k] == v for p in points)}
    return "population" + (f",{point_name(shared)}" if shared else "")


def pack_locations(configs: list, cap: int | None = None) -> dict:
    """{point name: (workdir name, member suffix)} of every packed point."""
    locations = {}
    for indices, population in packs(configs, cap):
        if population is None:
            continue
        points = [configs[i][0] for i in indices]
        for member, point in enumerate(points):
            locations[point_name(point)] = (pack_name(points), f"_m{member}")
    return locations


def read_table(path: str) -> list[dict]:
    """A results.csv as rows; numeric cells become floats, empty cells None (for notebooks)."""

    def parse(cell: str):
        if cell == "":
            return None
        try:
            return float(cell)
        except ValueError:
            return cell

    with open(path, newline="") as f:
        return [{key: parse(cell) for key, cell in row.items()} for row in csv.DictReader(f)]


def run_sweep(
    base_config_path_or_config,
    grid: dict,
    root_workdir: str,
    *,
    variant: str | None = None,
    overrides: dict | None = None,
    tied: dict | None = None,
    command: str = "",
    pack: bool = False,
) -> list[dict]:
    """Checks every point's config, then runs every unfinished point of `grid`, then writes the
    tables; returns the table's rows. `pack`: points that can share a program train as the
    members of one population run (`packs`), in ROOT/population[,<shared values>]."""
    sweep = dict(base=base_config_path_or_config, grid=grid, overrides=overrides, tied=tied)
    configs = point_configs(sweep, variant, num_devices=jax.device_count())
    _make_root(root_workdir)
    jobs = []  # (name, config, the points it trains)
    for indices, population in (
        packs(configs, _cap(configs)) if pack else [([i], None) for i in range(len(configs))]
    ):
        points = [configs[i][0] for i in indices]
        if population is None:
            jobs.append((point_name(points[0]), configs[indices[0]][1], points[0]))
        else:
            jobs.append((pack_name(points), population, {"members": points}))
    done = [os.path.exists(os.path.join(root_workdir, name, DONE_FILE)) for name, _, _ in jobs]
    # A bar on a terminal; elsewhere the log lines below say it all (no throttled repeats).
    task = progress.Task(
        "sweep", len(jobs), enabled=parallel.is_main_process(), interval_s=math.inf
    )
    durations = []  # seconds of the points trained by this call
    try:
        for index, (name, config, point) in enumerate(jobs, start=1):
            workdir = os.path.join(root_workdir, name)
            if done[index - 1]:
                log.info("[%d/%d] %s: skipped (finished)", index, len(jobs), name)
                continue
            eta = progress.format_eta(sweep_eta_s(durations, done[index:].count(False)))
            task.update(index - 1, f"[{index}/{len(jobs)}] {name} | ETA {eta}")
            log.info(
                "[%d/%d] %s: training in %s (sweep ETA %s)", index, len(jobs), name, workdir, eta
            )
            start = time.perf_counter()
            if run_point(config, workdir, point).get("preempted"):
                log.warning("preempted during %s: rerun the same command to resume", workdir)
                break
            durations.append(time.perf_counter() - start)
            task.update(index, f"[{index}/{len(jobs)}] {name} finished")
    finally:
        task.close()
    locations = pack_locations(configs, _cap(configs)) if pack else None
    return write_tables(root_workdir, grid, command=command, locations=locations)


def _cap(configs: list) -> int | None:
    """The most members of a population of these points that fit a device (memory.py)."""
    from simco_jax import memory  # noqa: PLC0415 - only a packed sweep asks

    # The probe's classes barely move the estimate and are not known before the data is
    # loaded: ImageNet's 1000 bound every source's.
    return memory.largest_population(configs[0][1], 1000, jax.device_count())


def _make_root(root: str) -> None:
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as error:
        raise config_lib.ConfigError(
            f"cannot make --workdir={root!r} ({error.strerror}); pass a writable directory"
        ) from None


def sweep_eta_s(durations: list[float], points_left: int) -> float:
    """The sweep's ETA as a point starts: it and the `points_left` after it, each as long as the
    mean point trained so far by this call (NaN before one has finished)."""
    if not durations:
        return math.nan
    return (points_left + 1) * sum(durations) / len(durations)


def main(argv=None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m simco_jax.sweep", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sweep", required=True, help="a sweep file, e.g. sweeps/batch_size.py")
    parser.add_argument("--workdir", required=True, help="root directory of the sweep's runs")
    parser.add_argument("--variant", default=None, help="config variant, e.g. smoke")
    parser.add_argument(
        "--table_only", action="store_true", help="only rewrite the tables from existing runs"
    )
    parser.add_argument(
        "--pack",
        action="store_true",
        help="train the points that can share a program as one population run (also: the "
        "sweep file's 'pack': True)",
    )
    args = parser.parse_args(argv)
    # force: importing Orbax already logged through absl, whose first log call before app.run
    # installs logging's default handler (and format) on the root logger.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", force=True
    )
    logging.getLogger("simco_jax").setLevel(logging.INFO)  # our progress; libraries stay quiet
    command = "python -m simco_jax.sweep " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--table_only"
    )
    try:
        sweep = load_sweep(args.sweep, args.variant)
        pack = args.pack or bool(sweep.get("pack"))
        if args.table_only:
            configs = point_configs(sweep, args.variant)  # the same checks: a typo is no table
            _make_root(args.workdir)
            locations = pack_locations(configs, _cap(configs)) if pack else None
            rows = write_tables(args.workdir, sweep["grid"], command=command, locations=locations)
        else:
            rows = run_sweep(
                sweep.get("base", DEFAULT_BASE),
                sweep["grid"],
                args.workdir,
                variant=args.variant,
                overrides=sweep.get("overrides"),
                tied=sweep.get("tied"),
                command=command,
                pack=pack,
            )
    except EXPECTED_ERRORS as error:
        cli.fail(str(error))
    print(f"{len(rows)} points; tables in {args.workdir}/results.csv and results.md")


if __name__ == "__main__":
    main()
