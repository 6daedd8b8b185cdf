"""The benchmarks' command lines: a bad argument is one line and exit 2, before any device work."""

import importlib.util
import os

import pytest
from helpers import REPO, run_python


def _benchmark(name):
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", os.path.join(REPO, "benchmarks", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("throughput", ["--frameworks=simko"], "--frameworks: unknown 'simko'; known: simco, "),
        ("throughput", ["--batch_sizes=64,x"], "--batch_sizes='64,x': not comma-separated integ"),
        ("throughput", ["--rows=simco"], "--rows: 'simco' is not framework:batch[:queue]"),
        ("throughput", ["--rows=simco:32:x"], "--rows simco:32:x='32,x': not comma-separated"),
        ("throughput", ["--rows=simco:32", "--set=lr"], "--set 'lr': write --set KEY=VALUE"),
        ("throughput", ["--rows=simco:32", "--set=lr_x=1"], "(did you mean --set lr?)"),
        ("throughput", ["--rows=simco:32", "--set=lr=x"], "--set lr='x': the config's lr is"),
        ("throughput", ["--rows=simco:32", "--variant=smok"], "unknown config variant 'smok'"),
        ("throughput", ["--rows=simco:32", "--set=temperature=0.0"], "temperature must be a"),
        ("throughput", ["--rows=simco:32", "--baseline=x"], "--baseline='x': not comma-separated"),
        ("throughput", ["--dtype=float16"], "argument --dtype: invalid choice: 'float16'"),
        ("memory_plan", ["--batches=2,a"], "argument --batches: '2,a': invalid literal for int"),
        ("memory_plan", ["--frameworks=simko"], "--frameworks: no configs/simko_imagenet.py"),
        ("memory_plan", ["--variant=x"], "unknown config variant 'x'; known: imagenet100"),
        ("input_pipeline", ["--image_dir=/no/such/dir"], "--image_dir='/no/such/dir' is not a dir"),
        ("input_pipeline", ["--steps=0"], "--repeats, --steps, --rounds >= 1"),
        ("prepare_device_payload", ["--source=/no/such.npz"], "--source='/no/such.npz' is not a"),
        ("prepare_device_payload", [], "the following arguments are required: --source"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(name, argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        _benchmark(name).main(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert sum(line.startswith("error: ") for line in err) == 1 and "usage:" not in "\n".join(err)


def test_a_bad_argument_through_the_command_line(tmp_path):
    result = run_python(["benchmarks/throughput.py", "--frameworks=simko"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --frameworks: unknown")
