"""Every ``engram`` subcommand's --help explains each option in a sentence and shows an example: a new flag
without help text, or a new subcommand without an example, fails here."""

from __future__ import annotations

import argparse

import pytest

from engram.cli import build_parser, main


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_option_has_help_and_the_command_shows_an_example(name, capsys):
    parser = _subcommands()[name]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help.split()) >= 3, f"engram {name} {label}: no help sentence"
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    example = text.split("example:\n", 1)
    assert len(example) == 2 and f"engram {name}" in example[1], f"engram {name} --help shows no example"
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text, (name, option)


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in _subcommands():
        assert name in text
