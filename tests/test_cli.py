"""The `avssl` command: help on every subcommand, clean errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from avssl.cli import build_parser, main

SUBCOMMANDS = [
    ["data", "synth"], ["data", "stats"], ["data", "inspect"], ["bench", "data"], ["bench", "model"], ["bench", "train"],
    ["pretrain"], ["export"], ["submit"], ["jobs"],
]


@pytest.mark.parametrize("words", [[]] + sorted({tuple(w[:1]) for w in SUBCOMMANDS}) + SUBCOMMANDS, ids=lambda w: " ".join(w) or "avssl")
def test_help_on_every_subcommand(words, capsys):
    """`avssl ... --help` prints usage and exits 0 for the command and every subcommand."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*list(words), "--help"])
    assert exc.value.code == 0 and "usage: avssl" in capsys.readouterr().out


def test_the_command_skips_the_collection_at_exit():
    """The command's last exit handler freezes the garbage collector's objects, so the interpreter
    does not walk torch's, Ray's and MLflow's objects once more at exit (about 2 s of CPU after a
    run). A handler registered before the command runs after it and sees them frozen."""
    code = ("import atexit, gc; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
            "from avssl.cli import main; raise SystemExit(main(['data', 'inspect', '.']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout.strip().endswith("frozen True"), proc.stdout + proc.stderr


def test_bad_config_key_is_one_clear_line_not_a_traceback(tmp_path):
    """A misspelled key exits 2 naming the file, key path and fix, with no traceback."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("synth:\n  num_speakrs: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "avssl.cli", "data", "synth", "--config", str(recipe), "--out", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "synth.num_speakrs" in proc.stderr and str(recipe) in proc.stderr.replace("\n", "")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_missing_corpus_is_a_clear_error(tmp_path, capsys):
    """Inspecting a folder that is not a corpus says how to make one."""
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "avssl data synth" in capsys.readouterr().err


def test_zero_shot_evaluation_of_a_folder_that_is_no_release_is_a_clear_error(tmp_path, capsys):
    """A mistyped --checkpoint names the path and what to pass, instead of transformers' hub traceback,
    and leaves no report folder behind."""
    missing = tmp_path / "runs" / "demo" / "release"
    code = main(["evaluate", "--checkpoint", str(missing), "--task", "speaker", "--data", str(tmp_path), "--zero-shot"])
    err = capsys.readouterr().err.replace("\n", "")
    assert code == 2 and str(missing) in err and "runs/NAME/avssl/release" in err
    assert not (tmp_path / "runs").exists()
