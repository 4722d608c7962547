"""The command layer: every command module has add_parser and run, and the one user-error
funnel turns user errors into one line and exit status 2 while bugs keep their traceback."""

from __future__ import annotations

import argparse

import pytest

from gatelab import commands
from gatelab.cli import build_parser, main
from gatelab.commands import _common
from gatelab.recipes import RecipeError
from gatelab.train import TrainError
from gatelab.train.checkpoint import CheckpointError


def test_every_command_module_has_add_parser_and_run():
    for name in commands.COMMANDS:
        module = commands.command(name)
        assert callable(module.add_parser) and callable(module.run), name
    names = build_parser()._subparsers._group_actions[0].choices
    assert list(names) == list(commands.COMMANDS)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("--keep must be >= 1"),
        RecipeError("unknown key 'x'"),
        FileNotFoundError("run/ does not exist"),
        NotADirectoryError("out is a file"),
        IsADirectoryError("out is a directory"),
        FileExistsError("out exists"),
        PermissionError("cannot write out"),
        CheckpointError("checkpoint is corrupt"),
        TrainError("run dir holds another run"),
    ],
)
def test_user_errors_end_as_one_line_and_status_2(error, monkeypatch, capsys):
    monkeypatch.delenv(_common.TRACEBACK_ENV, raising=False)

    def run(args):
        raise type(error)(f"{error}\nsecond line")

    monkeypatch.setattr(commands.command("info"), "run", run)
    assert main(["info", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert err == f"gatelab info: error: {error}; second line\n"


def test_a_sub_benchmark_is_named_in_the_message(capsys):
    args = argparse.Namespace(command="bench", benchmark="train")
    assert _common.run_guarded(lambda a: (_ for _ in ()).throw(ValueError("bad")), args) == 2
    assert capsys.readouterr().err == "gatelab bench train: error: bad\n"


@pytest.mark.parametrize("bug", [TypeError, KeyError, RuntimeError, AttributeError])
def test_a_bug_keeps_its_traceback(bug, monkeypatch):
    def run(args):
        raise bug("a bug")

    monkeypatch.setattr(commands.command("info"), "run", run)
    with pytest.raises(bug):
        main(["info", "somewhere"])


def test_gatelab_traceback_reraises_user_errors(monkeypatch, capsys):
    monkeypatch.setenv(_common.TRACEBACK_ENV, "1")
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["eval", "/nonexistent/run"])
    monkeypatch.setenv(_common.TRACEBACK_ENV, "0")
    assert main(["eval", "/nonexistent/run"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_usage_errors_keep_argparse_status_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train"])
    assert exit_.value.code == 2
    assert "usage: gatelab train" in capsys.readouterr().err


def test_help_documents_the_traceback_switch(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "GATELAB_TRACEBACK=1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("parse", "text", "value", "message"),
    [
        (_common.int_at_least(1), "3", 3, None),
        (_common.int_at_least(1), "0", None, "must be >= 1, got 0"),
        (_common.int_at_least(0), "x", None, "expected an integer, got 'x'"),
        (_common.positive(float), "2.5", 2.5, None),
        (_common.positive(float), "inf", None, "must be > 0, got inf"),
        (_common.positive(int), "1.5", None, "expected an integer, got '1.5'"),
        (_common.shape_arg, "t=8,4,8,4,2", None, None),
        (_common.shape_arg, "8,4,8,4", None, "T,D,F,E,k"),
    ],
)
def test_argument_types(parse, text, value, message):
    if message is not None:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
    elif value is not None:
        assert parse(text) == value
    else:
        assert parse(text).name == "t"


def test_is_main_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert _common.is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not _common.is_main_process()
