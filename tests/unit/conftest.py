"""The unit tier: no sockets, no processes.

Every test under tests/unit runs in-process against plain objects, files in tmp_path and fakes; that is
what keeps the tier at a few seconds. A test here that connects or binds a socket, or starts a process,
fails at once and says which, so it moves to tests/ (beside the emulator) instead of slowing the tier.
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any, NoReturn

import pytest


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        pytest.fail(f"a unit test may not {what}: this test belongs in tests/, beside the emulator and the "
                    f"command (tests/unit runs with no sockets and no subprocesses)", pytrace=False)

    return refused


@pytest.fixture(autouse=True)
def _no_sockets_and_no_processes(monkeypatch):
    for method in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, method, _refuse(f"{method} a socket"))
    monkeypatch.setattr(subprocess.Popen, "_execute_child", _refuse("start a subprocess"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse(f"start a process (os.{name})"))
