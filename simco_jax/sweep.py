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

Each point trains in ROOT/<key=value,...> (rerunning the command resumes interrupted points and
skips finished ones: those with a `sweep_point.json`). The table (ROOT/results.csv and
ROOT/results.md) has one row per point: the grid values, the final online-probe top-1/top-5, the
last kNN top-1, the steps trained, the wall time of the call that finished the point, and the
hardware. `PUBLISHED` holds the official repository's batch-size table for plots beside it.
"""

from __future__ import annotations

import argparse
import csv
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

from simco_jax import parallel, progress, train, writers

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


def load_module(path: str):
    """A Python file as a module; relative paths resolve from the cwd, then the repository."""
    candidates = [path, os.path.join(REPO, path)]
    found = next((p for p in candidates if os.path.exists(p)), None)
    if found is None:
        raise FileNotFoundError(f"{path} not found (looked in {os.getcwd()} and {REPO})")
    name = "_simco_file_" + os.path.splitext(os.path.basename(found))[0]
    spec = importlib.util.spec_from_file_location(name, found)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sweep(path: str, variant: str | None = None) -> dict:
    sweep = load_module(path).get_sweep(variant)
    if not sweep.get("grid"):
        raise ValueError(f"{path}: get_sweep() must return a dict with a non-empty 'grid'")
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
    """The point's config: base (a ConfigDict or a config file), overrides, grid values, ties."""
    point = dict(point)
    framework = point.pop("framework", None)
    if framework is not None:
        base = f"configs/{framework}_cifar.py"
    if isinstance(base, str):
        config = load_module(base).get_config(variant)
    else:
        config = ml_collections.ConfigDict(base.to_dict())
    config.update(overrides or {})
    config.update(point)
    for key, source in (tied or {}).items():
        config[key] = config[source]
    return config


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


def point_results(workdir: str) -> dict:
    """The table's metrics of one point from its metrics.jsonl and sweep_point.json."""
    row = dict.fromkeys(METRIC_COLUMNS, "")
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return row
    records = writers.read_metrics(workdir)
    for key in ("probe_top1", "probe_top5", "knn_top1"):
        values = [r[key] for r in records if key in r]
        row[key] = round(values[-1], 2) if values else ""
    row["steps"] = max((r["step"] for r in records), default="")
    done_path = os.path.join(workdir, DONE_FILE)
    if os.path.exists(done_path):
        with open(done_path) as f:
            done = json.load(f)
        row.update(steps=done["steps"], wall_s=round(done["wall_s"], 1), device=done["device"])
    return row


def write_tables(root: str, grid: dict, *, command: str = "") -> list[dict]:
    """ROOT/results.csv and ROOT/results.md from every point's workdir; returns the rows."""
    rows = []
    for point in grid_points(grid):
        results = point_results(os.path.join(root, point_name(point)))
        rows.append({**{k: _format(v) for k, v in point.items()}, **results})
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
) -> list[dict]:
    """Runs every unfinished point of `grid`, then writes the tables; returns the table's rows."""
    os.makedirs(root_workdir, exist_ok=True)
    points = grid_points(grid)
    done = [os.path.exists(os.path.join(root_workdir, point_name(p), DONE_FILE)) for p in points]
    # A bar on a terminal; elsewhere the log lines below say it all (no throttled repeats).
    task = progress.Task(
        "sweep", len(points), enabled=parallel.is_main_process(), interval_s=math.inf
    )
    durations = []  # seconds of the points trained by this call
    try:
        for index, point in enumerate(points, start=1):
            name, workdir = point_name(point), os.path.join(root_workdir, point_name(point))
            if done[index - 1]:
                log.info("[%d/%d] %s: skipped (finished)", index, len(points), name)
                continue
            eta = progress.format_eta(sweep_eta_s(durations, done[index:].count(False)))
            task.update(index - 1, f"[{index}/{len(points)}] {name} | ETA {eta}")
            log.info(
                "[%d/%d] %s: training in %s (sweep ETA %s)", index, len(points), name, workdir, eta
            )
            config = point_config(
                base_config_path_or_config, point, variant=variant, overrides=overrides, tied=tied
            )
            start = time.perf_counter()
            if run_point(config, workdir, point).get("preempted"):
                log.warning("preempted during %s: rerun the same command to resume", workdir)
                break
            durations.append(time.perf_counter() - start)
            task.update(index, f"[{index}/{len(points)}] {name} finished")
    finally:
        task.close()
    return write_tables(root_workdir, grid, command=command)


def sweep_eta_s(durations: list[float], points_left: int) -> float:
    """The sweep's ETA as a point starts: it and the `points_left` after it, each as long as the
    mean point trained so far by this call (NaN before one has finished)."""
    if not durations:
        return math.nan
    return (points_left + 1) * sum(durations) / len(durations)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", required=True, help="a sweep file, e.g. sweeps/batch_size.py")
    parser.add_argument("--workdir", required=True, help="root directory of the sweep's runs")
    parser.add_argument("--variant", default=None, help="config variant, e.g. smoke")
    parser.add_argument(
        "--table_only", action="store_true", help="only rewrite the tables from existing runs"
    )
    args = parser.parse_args(argv)
    # force: importing Orbax already logged through absl, whose first log call before app.run
    # installs logging's default handler (and format) on the root logger.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", force=True
    )
    logging.getLogger("simco_jax").setLevel(logging.INFO)  # our progress; libraries stay quiet
    sweep = load_sweep(args.sweep, args.variant)
    command = "python -m simco_jax.sweep " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--table_only"
    )
    if args.table_only:
        os.makedirs(args.workdir, exist_ok=True)
        rows = write_tables(args.workdir, sweep["grid"], command=command)
    else:
        rows = run_sweep(
            sweep.get("base", "configs/simco_cifar.py"),
            sweep["grid"],
            args.workdir,
            variant=args.variant,
            overrides=sweep.get("overrides"),
            tied=sweep.get("tied"),
            command=command,
        )
    print(f"{len(rows)} points; tables in {args.workdir}/results.csv and results.md")


if __name__ == "__main__":
    main()
