"""The command line's flags: help on every option of every subcommand, one name per concept
(``--recipe`` and ``--tasks``, with their older names as aliases), and ``--version``."""

from __future__ import annotations

import argparse

import pytest

from prunelens.cli import build_parser
from prunelens.version import __version__


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update(action.choices)
    return out


SUBS = _subparsers(build_parser())


@pytest.mark.parametrize("command", sorted(SUBS))
def test_every_option_has_help(command: str) -> None:
    missing = [a.option_strings or [a.dest] for a in SUBS[command]._actions
               if not (a.help or "").strip() and not isinstance(a, argparse._HelpAction)]
    assert not missing, f"{command}: options without help: {missing}"
    SUBS[command].format_help()  # every %(default)s in a shared help expands


def test_the_top_level_options_have_help() -> None:
    ap = build_parser()
    assert all((a.help or "").strip() for a in ap._actions if a.option_strings)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"prunelens {__version__}"


def _dest(command: str, flag: str) -> str | None:
    return next((a.dest for a in SUBS[command]._actions if flag in a.option_strings), None)


@pytest.mark.parametrize("command", sorted(SUBS))
def test_one_name_per_concept(command: str) -> None:
    """Wherever a modification is given it is --recipe (--method, --candidates: aliases of the same
    option), and wherever tasks are given, --tasks (--task: its alias)."""
    if command == "sweep":  # sweep --method names a method family swept over --amounts, not a recipe
        return
    for alias in ("--method", "--candidates"):
        if _dest(command, alias) is not None:
            assert _dest(command, "--recipe") == _dest(command, alias), (command, alias)
    if _dest(command, "--task") is not None or _dest(command, "--tasks") is not None:
        assert _dest(command, "--task") == _dest(command, "--tasks") is not None, command


def test_aliases_parse_to_the_same_values() -> None:
    ap = build_parser()
    for cmd in (["compare", "--out", "x"], ["subspace"], ["paired", "--tasks", "mmlu"]):
        a = ap.parse_args([*cmd, "--recipe", "attn:1", "--method", "wanda:0.5"])
        assert a.method == ["attn:1", "wanda:0.5"]
    assert ap.parse_args(["subspace", "--task", "boolq", "--recipe", "attn:1"]).task == "boolq"
    assert ap.parse_args(["eval", "--task", "arc_easy"]).tasks == "arc_easy"
    adv = ap.parse_args(["advise", "--budget", "10%", "--use", "generative", "--recipe", "attn:1,wanda:0.5",
                         "--candidates", "gptq:w4g128"])
    assert adv.candidates == ["attn:1,wanda:0.5", "gptq:w4g128"]


def test_seed_and_batch_size_say_what_they_do() -> None:
    eval_help = SUBS["eval"].format_help()
    assert "sample of questions" in " ".join(eval_help.split())  # --seed also seeds the --limit sample
    assert "per forward pass" in eval_help
