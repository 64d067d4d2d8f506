"""Every command line of the project: -h works, and the help shows defaults."""
from __future__ import annotations

import configparser
import importlib

import pytest
from click.testing import CliRunner

from tests.conftest import REPO


def _entry_points() -> list[tuple[str, str]]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return [tuple(part.strip() for part in line.split("=", 1)) for line in lines]


@pytest.mark.parametrize("name,target", _entry_points())
def test_every_entry_point_has_short_help_with_defaults(name, target):
    module, func = target.split(":")
    main = getattr(importlib.import_module(module), func)
    result = CliRunner().invoke(main, ["-h"], prog_name=name)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: {name}")
    if any(getattr(p, "default", None) not in (None, False, ()) or getattr(p, "show_default", None)
           for p in main.params if not p.name == "help"):
        assert "[default: " in result.output


def test_train_help_shows_what_each_option_defaults_to():
    from imt.train.run import main

    out = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    assert "[default: (recipe, else 90)]" in out  # --epochs: run.epochs of train/config.py
    assert "[default: (recipe, else 'dali')]" in out  # --loader
