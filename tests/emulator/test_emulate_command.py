"""`batchrun emulate` refuses what it cannot serve with one line and exit code 2, never a traceback."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from emulator_helpers import config, endpoint

from batchrun.emulator import Emulator
from batchrun.errors import BatchrunError, EmulatorError

REPO = Path(__file__).resolve().parents[2]


def emulate(*args: str) -> tuple[int, str]:
    """Run `python -m batchrun emulate ARGS`; it must exit by itself. Returns (exit code, stderr)."""
    done = subprocess.run([sys.executable, "-m", "batchrun", "emulate", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    return done.returncode, done.stderr


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr and "internal error" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def busy_port():
    """A loopback port that something else is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_busy_control_port_is_one_line_naming_the_port(busy_port):
    code, stderr = emulate("--port", str(busy_port))
    assert code == 2
    line = one_line_error(stderr)
    assert f"port {busy_port} on 127.0.0.1 is already in use; pick another with --port" in line


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_a_non_loopback_host_is_refused_plainly(host):
    code, stderr = emulate("--host", host)
    assert code == 2
    line = one_line_error(stderr)
    assert f"--host {host}" in line
    assert "only binds loopback addresses (127.0.0.0/8, ::1, localhost)" in line
    assert "fixed token" in line


def test_a_job_spec_given_as_config_is_named_and_pointed_to_batchrun_run():
    code, stderr = emulate("--config", "jobs/quickstart.yaml")
    assert code == 2
    line = one_line_error(stderr)
    assert "jobs/quickstart.yaml" in line
    assert "this is a job spec" in line and "`batchrun run jobs/quickstart.yaml`" in line
    assert "token, host, control_port, endpoints" in line


def test_a_file_that_is_no_emulator_config_names_the_keys_expected(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("colour: red\nsize: 3\n")
    code, stderr = emulate("--config", str(path))
    assert code == 2
    line = one_line_error(stderr)
    assert str(path) in line and "unknown keys colour, size" in line
    assert "token, host, control_port, endpoints" in line


def test_a_busy_endpoint_port_in_the_config_is_one_line_naming_the_endpoint(tmp_path, busy_port):
    path = tmp_path / "emulator.yaml"
    path.write_text(f"endpoints:\n  - name: gen\n    initial_state: running\n    port: {busy_port}\n")
    code, stderr = emulate("--config", str(path))
    assert code == 2
    line = one_line_error(stderr)
    assert f"endpoint batchrun-local/gen: port {busy_port} on 127.0.0.1 is already in use" in line


def test_the_in_process_emulator_raises_emulator_error_for_a_busy_port_and_leaves_nothing_open(busy_port):
    async def body():
        emulator = Emulator(config(endpoint("free"), endpoint("taken", port=busy_port)))
        with pytest.raises(EmulatorError, match=f"endpoint batchrun-test/taken: port {busy_port} on 127.0.0.1"):
            await emulator.start()
        return emulator

    emulator = asyncio.run(body())
    assert emulator.servers() == [] and emulator._runner is None
    assert issubclass(EmulatorError, BatchrunError) and EmulatorError.exit_code == 2


def test_every_loopback_address_is_accepted_and_nothing_else():
    from batchrun.emulator.config import EmulatorConfigError, check_loopback_host

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_loopback_host(host)
    for host in ("0.0.0.0", "10.0.0.1", "example.org", "::"):
        with pytest.raises(EmulatorConfigError, match="only binds loopback addresses"):
            check_loopback_host(host)
