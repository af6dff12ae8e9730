"""Every number flag of every command refuses NaN and infinity when the command line is parsed,
with the flag named, before any work."""

import argparse

import pytest

from mmh_jax.cli import build_parser
from mmh_jax.experiments.common import finite_float


def _float_flags(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, option string, type) of every typed option below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _float_flags(sub, path + (name,))
        elif action.option_strings and action.type in (float, finite_float):
            yield path, action.option_strings[-1], action.type


FLAGS = list(_float_flags(build_parser()))


def test_every_float_flag_is_finite_checked():
    commands = {path for path, _, _ in FLAGS}
    # the commands with number flags named in the issue are all walked
    assert {
        ("sd", "detect"),
        ("sd", "mitigate"),
        ("demo", "digits"),
        ("cifar10", "run"),
        ("gan", "lid"),
    } <= commands
    assert [(p, f) for p, f, t in FLAGS if t is float] == []


@pytest.mark.parametrize(
    "path, flag", [(p, f) for p, f, _ in FLAGS], ids=[" ".join(p) + " " + f for p, f, _ in FLAGS]
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "seven"])
def test_non_finite_numbers_are_refused_at_parse_time(path, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*path, f"{flag}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and repr(value) in err
