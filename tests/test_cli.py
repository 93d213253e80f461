"""The command line's memory demo runs end to end on the CPU backend."""

from __future__ import annotations

import pytest

from vattention.cli import main


def test_memory_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory-demo", "--steps", "25", "--budget-mib", "64"]) == 0
    out = capsys.readouterr().out
    assert "reserved" in out and "served" in out and "mapped MiB" in out


def test_unknown_command_is_rejected() -> None:
    with pytest.raises(SystemExit):
        main(["no-such-command"])
