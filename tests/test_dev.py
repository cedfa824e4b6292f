"""dev.py, the bootstrap behind the README's test command: what it says when the install fails."""

from __future__ import annotations

import importlib.util
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dev(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("paperhooks_dev_script", ROOT / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")  # exists; setup() is told it works
    monkeypatch.setattr(module, "VENV", venv)
    monkeypatch.setattr(module, "STAMP", venv / ".paperhooks-setup")
    monkeypatch.setattr(module, "_works", lambda py: True)
    return module


def _pip_that_prints(text: str, rc: int):
    def call(cmd, cwd, stdout, stderr, stdin):
        stdout.write(text)
        return rc

    return call


def test_a_full_disk_is_named_with_the_space_free_and_needed(dev, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(dev.shutil, "disk_usage", lambda path: usage(100e9, 98.5e9, 1.5e9))
    monkeypatch.setattr(
        subprocess,
        "call",
        _pip_that_prints(
            "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device\n",
            1,
        ),
    )
    with pytest.raises(SystemExit) as exc:
        dev.setup(force=True)
    message = str(exc.value)
    assert "the disk is full (1.5 GB free now" in message
    assert f"about {dev.INSTALL_GB:.0f} GB" in message
    # the warning came before pip ran, with the same numbers
    assert "warning: 1.5 GB free" in capsys.readouterr().out
    assert not dev.STAMP.exists()


def test_another_pip_failure_keeps_the_plain_message_and_no_warning_when_space_is_ample(
    dev, monkeypatch, capsys
):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(dev.shutil, "disk_usage", lambda path: usage(100e9, 50e9, 50e9))
    monkeypatch.setattr(
        subprocess, "call", _pip_that_prints("ERROR: No matching distribution\n", 1)
    )
    with pytest.raises(SystemExit) as exc:
        dev.setup(force=True)
    assert str(exc.value).startswith("dev.py: pip install failed (exit 1); full log:")
    assert "warning" not in capsys.readouterr().out


def test_free_space_is_read_from_the_nearest_existing_parent(dev, tmp_path, monkeypatch):
    asked = []
    usage = namedtuple("usage", "total used free")

    def disk_usage(path):
        asked.append(Path(path))
        return usage(10e9, 7.5e9, 2.5e9)

    monkeypatch.setattr(dev.shutil, "disk_usage", disk_usage)
    assert dev._free_gb(tmp_path / "not" / "yet" / "made") == 2.5
    assert asked == [tmp_path]
