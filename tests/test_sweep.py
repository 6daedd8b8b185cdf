"""The sweep runner: a real two-point grid at smoke settings, its tables, skips, the studies."""

import csv
import glob
import logging
import os
import shutil
import signal

import numpy as np
import pytest
from helpers import REPO, framework_config, launched, run_python, wait_until

from simco_jax import config as config_lib
from simco_jax import sweep, train, writers

GRID = {"dt_m": [1.0, 10.0]}  # InfoNCE and dual temperature


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sweep"))
    base = framework_config("simco", max_steps=4)
    rows = sweep.run_sweep(base, GRID, root, command="python -m simco_jax.sweep (test)")
    return root, base, rows


def _copy_of(finished_sweep, tmp_path) -> str:
    """A copy of the finished sweep for a test that reruns it or rewrites its tables: the tests
    sharing the fixture may run in any order (xdist workers take each other's tests)."""
    root = str(tmp_path / "sweep")
    shutil.copytree(finished_sweep[0], root)
    return root


def test_sweep_trains_each_point_in_its_own_workdir_and_tabulates(finished_sweep):
    root, _, rows = finished_sweep
    assert sorted(os.listdir(root)) == [
        "dt_m=1.0",
        "dt_m=10.0",
        "results.csv",
        "results.md",
    ]
    with open(os.path.join(root, "results.csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["dt_m"] for r in table] == ["1.0", "10.0"]
    assert list(table[0]) == ["dt_m", *sweep.METRIC_COLUMNS]
    for row, dt_m in zip(table, ("1.0", "10.0"), strict=True):
        records = writers.read_metrics(os.path.join(root, f"dt_m={dt_m}"))
        final = [r for r in records if "probe_top1" in r][-1]
        assert float(row["probe_top1"]) == round(final["probe_top1"], 2)
        assert float(row["knn_top1"]) == round(final["knn_top1"], 2)
        assert row["steps"] == "4" and row["device"].endswith("cpu")
        assert float(row["wall_s"]) > 0
    # The two points really trained different objectives (dt_m = 1 is InfoNCE).
    losses = [
        writers.read_metrics(os.path.join(root, f"dt_m={d}"))[0]["loss"] for d in ("1.0", "10.0")
    ]
    assert losses[0] != losses[1]
    markdown = open(os.path.join(root, "results.md")).read().splitlines()
    assert markdown[0] == "Produced by `python -m simco_jax.sweep (test)`."
    assert markdown[2] == "| dt_m | " + " | ".join(sweep.METRIC_COLUMNS) + " |"
    assert len([line for line in markdown if line.startswith("| 1")]) == 2  # 1.0 and 10.0
    assert sweep.read_table(os.path.join(root, "results.csv"))[1]["dt_m"] == 10.0
    assert [(r["dt_m"], r["steps"]) for r in rows] == [("1.0", 4), ("10.0", 4)]


def _sweep_messages(caplog):
    messages = [r.getMessage() for r in caplog.records if r.name == "simco_jax.sweep"]
    caplog.clear()
    return messages


def test_rerun_skips_finished_points_and_resumes_unfinished_ones(
    finished_sweep, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="simco_jax")
    root, base = _copy_of(finished_sweep, tmp_path), finished_sweep[1]
    calls = []
    real = train.train_and_evaluate
    monkeypatch.setattr(train, "train_and_evaluate", lambda c, w: calls.append(w) or real(c, w))
    sweep.run_sweep(base, GRID, root)
    assert calls == []  # both finished: nothing trains
    assert _sweep_messages(caplog) == [
        "[1/2] dt_m=1.0: skipped (finished)",
        "[2/2] dt_m=10.0: skipped (finished)",
    ]
    os.remove(os.path.join(root, "dt_m=10.0", sweep.DONE_FILE))  # as if cut short
    sweep.run_sweep(base, GRID, root)
    assert calls == [os.path.join(root, "dt_m=10.0")]  # resumed from its checkpoint
    assert os.path.exists(os.path.join(root, "dt_m=10.0", sweep.DONE_FILE))
    assert _sweep_messages(caplog) == [
        "[1/2] dt_m=1.0: skipped (finished)",
        f"[2/2] dt_m=10.0: training in {root}/dt_m=10.0 (sweep ETA ?)",
    ]


def test_cli_says_which_point_runs(finished_sweep, tmp_path):
    """Under `python -m` the module is __main__: its messages must still show."""
    root = _copy_of(finished_sweep, tmp_path)
    sweep_file = tmp_path / "dt.py"
    sweep_file.write_text(
        "def get_sweep(variant=None):\n"
        "    return {'base': 'configs/simco_cifar.py', 'grid': {'dt_m': [1.0, 10.0]}}\n"
    )
    result = run_python(
        ["-m", "simco_jax.sweep", f"--sweep={sweep_file}", f"--workdir={root}", "--variant=smoke"]
    )
    assert "[1/2] dt_m=1.0: skipped (finished)" in result.stderr
    assert "[2/2] dt_m=10.0: skipped (finished)" in result.stderr
    assert "2 points; tables in" in result.stdout


def test_cli_table_only_rewrites_the_tables_with_its_command(finished_sweep, tmp_path):
    root = _copy_of(finished_sweep, tmp_path)
    sweep_file = tmp_path / "dt.py"
    sweep_file.write_text(
        "def get_sweep(variant=None):\n"
        "    return {'base': 'configs/simco_cifar.py', 'grid': {'dt_m': [1.0, 10.0]}}\n"
    )
    os.remove(os.path.join(root, "results.csv"))
    sweep.main([f"--sweep={sweep_file}", f"--workdir={root}", "--table_only"])
    assert len(sweep.read_table(os.path.join(root, "results.csv"))) == 2
    first = open(os.path.join(root, "results.md")).readline()
    assert (
        first == f"Produced by `python -m simco_jax.sweep --sweep={sweep_file} --workdir={root}`.\n"
    )


def test_point_names_configs_framework_and_ties():
    points = sweep.grid_points({"framework": ["mocov2", "simco"], "batch_size": [64, 128]})
    assert [sweep.point_name(p) for p in points] == [
        "framework=mocov2,batch_size=64",
        "framework=mocov2,batch_size=128",
        "framework=simco,batch_size=64",
        "framework=simco,batch_size=128",
    ]
    moco = sweep.point_config("configs/simco_cifar.py", points[1], variant="smoke")
    assert (moco.momentum_encoder, moco.queue_size, moco.dt_m, moco.symmetric) == (
        True,
        65536,
        1.0,
        False,
    )
    assert moco.batch_size == 128 and moco.dataset == "synthetic"
    tied = sweep.point_config(
        "configs/simmoco_cifar.py",
        {"base_tau_momentum": 0.9},
        tied={"final_tau_momentum": "base_tau_momentum"},
    )
    assert tied.base_tau_momentum == tied.final_tau_momentum == 0.9


@pytest.mark.parametrize("variant", [None, "smoke"])
def test_every_shipped_study_point_is_a_valid_config(variant):
    files = sorted(glob.glob(os.path.join(REPO, "sweeps", "*.py")))
    assert {os.path.basename(f) for f in files} >= {
        "batch_size.py",
        "dictionary_size.py",
        "momentum.py",
        "temperature.py",
    }
    for path in files:
        spec = sweep.load_sweep(path, variant)
        for point in sweep.grid_points(spec["grid"]):
            config = sweep.point_config(
                spec["base"],
                point,
                variant=variant,
                overrides=spec.get("overrides"),
                tied=spec.get("tied"),
            )
            config_lib.validate(config)


def test_full_batch_size_study_is_the_published_table():
    spec = sweep.load_sweep(os.path.join(REPO, "sweeps", "batch_size.py"))
    assert spec["grid"]["batch_size"] == sorted(sweep.PUBLISHED["simco"])
    assert sorted(spec["grid"]["framework"]) == sorted(sweep.PUBLISHED)
    assert sweep.PUBLISHED["simco"][256] == 58.35 and sweep.PUBLISHED["mocov2"][1024] == 48.90


# ------------------------------------------------- the shipped example tables reproduce

EXAMPLES = os.path.join(REPO, "notebooks", "example_results")
STUDIES = sorted(os.listdir(EXAMPLES))
# `wall_s` and `device` say how long a point took and where: they differ from run to run, so a
# reproduced table is compared on the grid values and these columns only. The metrics are
# deterministic on one CPU device (docs/reliability.md); on more devices they drift by rounding.
DETERMINISTIC = ("probe_top1", "probe_top5", "knn_top1", "steps")
# The same tables run on other kinds of host, whose float32 kernels round differently (a smoke
# run's accuracy moves by an image or two; see helpers.HOST_A): a rerun must equal one of them.
HOST_RECORDS = os.path.join(REPO, "tests", "host_records")


def _example_command(study: str) -> str:
    return (
        f"python -m simco_jax.sweep --sweep=sweeps/{study}.py "
        f"--workdir=runs/smoke/{study} --variant=smoke"
    )


def _deterministic_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k not in ("wall_s", "device")} for row in rows]


def test_shipped_example_tables_name_their_command_and_agree_with_the_docs():
    assert STUDIES == ["batch_size", "dictionary_size", "momentum", "temperature"]
    with open(os.path.join(REPO, "docs", "results.md")) as f:
        docs = f.read()
    for study in STUDIES:
        with open(os.path.join(EXAMPLES, study, "results.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        with open(os.path.join(EXAMPLES, study, "results.md")) as f:
            table = f.read()
        assert table.startswith(f"Produced by `{_example_command(study)}`.\n\n"), study
        assert {row["device"] for row in rows} == {"1x cpu"}, study  # what the check reproduces
        columns = list(rows[0])
        lines = table.splitlines()[2:]
        assert lines[0] == "| " + " | ".join(columns) + " |", study
        assert lines[2:] == ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows], study
        assert table in docs, f"docs/results.md lacks the current {study} smoke table"


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_shipped_example_table_is_what_its_command_prints_today(study, tmp_path):
    """The command in the table's first line, run now, gives the same table."""
    command = _example_command(study).replace(f"runs/smoke/{study}", str(tmp_path))
    env = {"XLA_FLAGS": ""}  # one CPU device, as the shipped tables
    run_python(command.split()[1:], env_extra=env)
    hosts = sorted(os.listdir(HOST_RECORDS))
    recorded = [os.path.join(EXAMPLES, study, "results.csv")] + [
        os.path.join(HOST_RECORDS, host, f"{study}.csv") for host in hosts
    ]
    today = _deterministic_rows(os.path.join(tmp_path, "results.csv"))
    assert any(today == _deterministic_rows(path) for path in recorded), (
        f"notebooks/example_results/{study} is stale: rerun `{_example_command(study)}` and "
        "copy results.csv and results.md there and the table into docs/results.md (and "
        f"results.csv to tests/host_records/<host>/{study}.csv on the other kinds of host)"
    )


def _sweep_file(tmp_path, text, name="study.py"):
    path = tmp_path / name
    path.write_text(f"def get_sweep(variant=None):\n    return {text}\n")
    return str(path)


@pytest.mark.parametrize(
    "sweep_text, message",
    [
        ("{'grid': {}}", r"'grid' must be a non-empty dict, got \{\}$"),
        ("{'grid': {'dt_m': []}}", r"grid\['dt_m'\] must be a non-empty list of values, got \[\]"),
        ("{'grid': {'dt_m': 1.0}}", r"grid\['dt_m'\] must be a non-empty list of values, got 1.0"),
        ("[1]", r"get_sweep\(\) must return a dict, got \[1\]"),
        ("{'grid': {'dt_m': [1.0]}, 'overide': {}}", r"unknown sweep key overide \(did you mean"),
        ("{'grid': {'framework': ['simko']}}", "unknown framework 'simko'; known: byol, mocov2"),
    ],
)
def test_a_malformed_sweep_file_is_refused_in_one_line(sweep_text, message, tmp_path):
    with pytest.raises(config_lib.ConfigError, match=message) as raised:
        sweep.load_sweep(_sweep_file(tmp_path, sweep_text))
    assert "\n" not in str(raised.value)


def test_a_missing_sweep_file_is_named(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"nope.py is not a file \(looked in "):
        sweep.load_sweep(str(tmp_path / "nope.py"))


@pytest.mark.parametrize(
    "spec, variant, message",
    [
        (
            {"grid": {"batch_sise": [32]}},
            "smoke",
            r"^point batch_sise=32: unknown config key batch_sise \(did you mean batch_size\?\)",
        ),
        (
            {"grid": {"batch_size": ["x"]}},
            "smoke",
            r"^point batch_size=x: batch_size must be an integer in \[1, 1048576\], got 'x'$",
        ),
        ({"grid": {"dt_m": [1.0, 1e39]}}, "smoke", r"^point dt_m=1e\+39: dt_m must be a finite"),
        ({"grid": {"dt_m": [1.0]}, "tied": {"x": "dt_m"}}, "smoke", "unknown config key x"),
        ({"grid": {"dt_m": [1.0]}}, "smok", "^point dt_m=1.0: unknown config variant 'smok'"),
    ],
)
def test_every_points_config_is_checked(spec, variant, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        sweep.point_configs(spec, variant)


def test_a_bad_point_stops_the_sweep_before_the_first_point_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a: pytest.fail("trained"))
    root = tmp_path / "root"
    base = framework_config("simco")
    with pytest.raises(config_lib.ConfigError, match="point dt_m=0.0: dt_m must be"):
        sweep.run_sweep(base, {"dt_m": [1.0, 0.0]}, str(root))
    assert not root.exists()


def test_a_period_in_a_sweep_replaces_the_bases_other_spelling():
    spec = {"grid": {"log_every_epochs": [1.0]}, "overrides": {"checkpoint_every_epochs": 2.0}}
    [(_, config)] = sweep.point_configs(spec, "smoke")
    assert (config.log_every_steps, config.checkpoint_every_steps) == (None, None)


def test_cli_refuses_an_unknown_variant_before_anything_runs(tmp_path):
    """`--variant=smok` once ran the full 15-point grid: now one line, exit 2, nothing made."""
    root = tmp_path / "root"
    args = ["-m", "simco_jax.sweep", "--sweep=sweeps/batch_size.py", f"--workdir={root}"]
    result = run_python([*args, "--variant=smok"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: point framework=mocov2,batch_size=64: unknown config variant 'smok'; known: "
        "smoke, cifar10, cifar100 (comma-separated, e.g. :smoke,cifar10)"
    )
    assert not root.exists()


# ------------------------------------------------- packed into population runs


def test_seeds_and_temperatures_pack_into_one_population_run_with_mean_and_std(tmp_path):
    grid = {"seed": [0, 1], "temperature": [0.1, 0.2]}
    base = framework_config("simco", max_steps=2, synthetic_num_train=96, backbone_width=8)
    configs = sweep.point_configs(dict(base=base, grid=grid), None)
    ((indices, population),) = sweep.packs(configs)  # one population of the four points
    assert sorted(indices) == [0, 1, 2, 3] and population is not None
    root = str(tmp_path / "sweep")
    # SIGKILL after the first checkpoint: the rerun resumes the population run.
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from helpers import framework_config\n"
        "from simco_jax import sweep\n"
        f"base = framework_config('simco', max_steps=2, synthetic_num_train=96, "
        f"backbone_width=8, checkpoint_every_steps=1)\n"
        f"sweep.run_sweep(base, {grid!r}, {root!r}, pack=True)\n"
    )
    with launched(["-c", script], tmp_path / "log") as process:
        wait_until(
            lambda: os.path.isdir(os.path.join(root, "population", "checkpoints", "1")),
            [(process, tmp_path / "log")],
            "the population's first checkpoint",
        )
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not os.path.exists(os.path.join(root, "population", sweep.DONE_FILE))
    run_python(["-c", script])
    assert sorted(os.listdir(root)) == ["population", "results.csv", "results.md"]
    rows = sweep.read_table(os.path.join(root, "results.csv"))
    assert [(r["seed"], r["temperature"]) for r in rows] == [
        (0.0, 0.1),
        (0.0, 0.2),
        (1.0, 0.1),
        (1.0, 0.2),
        ("mean ± std", 0.1),
        ("mean ± std", 0.2),
    ]
    records = writers.read_metrics(os.path.join(root, "population"))
    final = [r for r in records if "probe_top1_m0" in r][-1]
    order = [(m.seed, m.temperature) for m in config_lib.member_configs(population)]
    for row in rows[:4]:
        member = order.index((int(row["seed"]), row["temperature"]))
        assert row["probe_top1"] == round(final[f"probe_top1_m{member}"], 2)
    values = [rows[i]["probe_top1"] for i in (0, 2)]
    mean, std = np.mean(values), np.std(values, ddof=1)
    assert rows[4]["probe_top1"] == f"{mean:.2f} ± {std:.2f}"
