"""The command lines' shared parts: argparse errors in one line, comma-separated lists."""

import pytest

from simco_jax import cli


def _parser():
    parser = cli.ArgumentParser(prog="tool")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--sizes", type=cli.comma_list(int), default=[1])
    return parser


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "error: the following arguments are required: --n (see tool --help)"),
        (["--n=x"], "error: argument --n: invalid int value: 'x' (see tool --help)"),
        (["--n=1", "--bogus"], "error: unrecognized arguments: --bogus (see tool --help)"),
        (["--n=1", "--sizes=1,b"], "error: argument --sizes: '1,b': invalid literal for int()"),
        (["--n=1", "--sizes=,"], "error: argument --sizes: ',' lists nothing (see tool --help)"),
    ],
)
def test_argument_errors_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        _parser().parse_args(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err


def test_comma_lists_parse():
    assert _parser().parse_args(["--n=1", "--sizes=64, 128"]).sizes == [64, 128]
