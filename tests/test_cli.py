"""The command line's conventions: --version, help and defaults of every option, compare's short default list,
and a backbone that cannot be opened here reported in one line before Ray starts."""

import argparse
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from asd_ray.cli import build_parser, main
from asd_ray.cli_args import DETECTORS, detector_names
from asd_ray.errors import BackboneError
from asd_ray.models.hub import check_available
from tiny import command_env

CHECKOUT = Path(__file__).resolve().parents[1]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_version_names_the_package_version_and_the_checkouts_commit(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"asd-ray {version('asd-ray')}")
    if (CHECKOUT / ".git").exists():
        head = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0:
            assert f"(commit {head.stdout.strip()[:12]}" in printed


def test_every_option_of_every_command_has_help_and_help_shows_the_defaults():
    parser = build_parser()
    commands = subcommands(parser)
    assert set(commands) == {"synth", "run", "evaluate", "serve-fleet", "serve", "finetune", "sweep", "embed",
                             "compare"}
    for name, p in [("asd-ray", parser), *commands.items()]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
    text = {name: " ".join(p.format_help().split()) for name, p in commands.items()}
    assert "--verbose" in parser.format_help() and "--version" in parser.format_help()
    assert "(default: 990)" in text["synth"] and "(default: 50)" in text["synth"]
    assert "(2025: ToyCar ToyTrain bearing fan gearbox slider valve; 2026: ToyCar ToyCarEmu" in text["synth"]
    assert "(default: runs/demo)" in text["run"] and "default: fusion" in text["run"]
    assert "default: logmel" in text["run"] and "default: logmel" in text["embed"]
    assert "default: facebook/hubert-base-ls960" in text["finetune"] and "default: 8000" in text["serve"]
    assert "(default: 5.0)" in text["serve-fleet"] and "(default: runs/sweep)" in text["sweep"]
    for t in text.values():  # no default where there is none to show
        assert "(default: None)" not in t and "(default: False)" not in t and "(default: [])" not in t


def test_compare_runs_four_detectors_unless_told_all():
    parsed = build_parser().parse_args(["compare"])
    assert detector_names(parsed.detectors) == ["fusion", "knn", "local", "ae-maha"]
    every = build_parser().parse_args(["compare", "--detectors", "all"])
    assert detector_names(every.detectors) == list(DETECTORS) and len(DETECTORS) == 16
    assert detector_names(["knn", "pooled", "knn"]) == ["knn", "pooled"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--detectors", "nearest"])


def test_a_backbone_that_cannot_be_opened_here_is_one_line(tmp_path):
    check_available("logmel")
    with pytest.raises(BackboneError, match="checkpoint directory not found or has no config.json"):
        check_available(str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(BackboneError, match="not found"):
        check_available("runs/finetune/checkpoint")  # three parts: a path, never a hub id
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    check_available(str(tmp_path / "ckpt"))


def test_an_offline_hub_id_fails_in_one_line_before_ray_starts(tiny_corpus, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty hub cache: the hub is never asked; the run stops before Ray starts (the
    embedding actors used to print about 100 lines of traceback)."""
    env = {**command_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "asd_ray.cli", "run", "--data", str(tiny_corpus), "--machines",
                           "valve", "--detector", "knn", "--backbone", "facebook/hubert-base-ls960",
                           "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("asd-ray run: error: embed.backbone=facebook/hubert-base-ls960 is a hub id that "
                               "cannot be downloaded here")
    assert "pass a local checkpoint directory instead (--backbone DIR" in lines[0]
    assert not (tmp_path / "run" / "run.log").exists() or "Started a local Ray" not in (tmp_path / "run" / "run.log").read_text()


def test_a_command_leaves_the_handlers_of_a_process_that_set_up_logging_alone(tmp_path):
    """main() used to set the root logger's first handler to WARNING: called in a process with handlers of its own
    (an application, pytest), INFO records logged after it were lost to whoever had installed that handler."""
    import logging

    from asd_ray.cli import main

    root = logging.getLogger()
    theirs = logging.Handler(logging.INFO)
    root.handlers.insert(0, theirs)
    try:
        main(["evaluate", "--scores", str(tmp_path / "none"), "--data", str(tmp_path)])  # fails; logging is set up
        assert theirs.level == logging.INFO
        assert not [h for h in root.handlers if h.get_name() == "asd-ray console"]  # and adds none beside them
    finally:
        root.removeHandler(theirs)
