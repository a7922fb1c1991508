"""Every CLI choice of backend comes from the registry: a backend added there shows up here."""

from __future__ import annotations

import pytest

from bon_tracker.backends import BACKENDS
from bon_tracker.cli.main import main as cli_main


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit):
        cli_main([*command, "--help"])
    return capsys.readouterr().out


def test_compare_help_names_the_run_reference_of_every_backend(capsys):
    text = _help(capsys, "compare")
    for name in BACKENDS:
        assert f"{name}:" in text


def test_analyze_offers_every_registered_backend(capsys):
    text = _help(capsys, "analyze")
    assert "{" + ",".join(BACKENDS) + "}" in text.replace("\n", "").replace(" ", "")
