"""The ledger of the user's settings alone (endpoints/settings_ledger.py): what the job changes, what the
release does and puts back, and what it adopts from a run killed before it could put the endpoint back."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchrun.endpoints.control_plane import EndpointSnapshot
from batchrun.endpoints.dedicated import LifecycleSettings
from batchrun.endpoints.saved_settings import endpoint_state_path
from batchrun.endpoints.settings_ledger import SettingsLedger
from batchrun.endpoints.shared_endpoint import SharedUse

API = "http://127.0.0.1:9/v2"


@dataclass
class Control:
    """The ledger reads only where the endpoint is; it never calls the control plane."""

    namespace: str = "ns"
    name: str = "gen"
    api_url: str = API


def snap(state: str = "paused", min_replica: int = 1, max_replica: int = 1, stz: int | None = 30) -> EndpointSnapshot:
    return EndpointSnapshot(
        name="gen", namespace="ns", state=state, url=None, message="", task="text-generation",
        repository="org/model", revision=None, health_route="/health", ready_replicas=0, target_replicas=0,
        min_replica=min_replica, max_replica=max_replica, scale_to_zero_timeout=stz,
    )


def ledger(tmp_path: Path, events: list[str] | None = None, **settings) -> SettingsLedger:
    values = {"state_file": str(tmp_path / "settings.json"), **settings}
    return SettingsLedger(Control(), LifecycleSettings(**values), on_event=(events if events is not None else []).append)


@pytest.mark.parametrize(("on_finish", "state", "earlier_run_found", "action"), [
    (None, "paused", None, "pause"),
    (None, "scaledToZero", None, "pause"),
    (None, "running", None, "keep"),  # the user had it running: left running
    (None, "running", "paused", "pause"),  # running only because a killed run resumed it
    (None, "paused", "running", "keep"),
    ("pause", "running", None, "pause"),
    ("scale-to-zero", "paused", None, "scale-to-zero"),
    ("keep", "paused", None, "keep"),
])
def test_the_final_action(tmp_path, on_finish, state, earlier_run_found, action):
    book = ledger(tmp_path, on_finish=on_finish)
    book.initial_state = earlier_run_found
    assert book.final_action(snap(state)) == action


@pytest.mark.parametrize(("changed", "original", "restore"), [
    ({}, snap(), {}),
    ({"min_replica": 2}, snap(min_replica=1), {"min_replica": 1}),
    ({"min_replica": 2, "max_replica": 4, "scale_to_zero_timeout": 15}, snap(min_replica=0, max_replica=3, stz=60),
     {"min_replica": 0, "max_replica": 3, "scale_to_zero_timeout": 60}),
    ({"scale_to_zero_timeout": 15}, snap(stz=None), {}),  # the user had none: nothing to send back
])
def test_what_the_release_puts_back(tmp_path, changed, original, restore):
    book = ledger(tmp_path)
    book.changed.update(changed)
    assert book.restore(original) == restore


@pytest.mark.parametrize(("settings", "original", "values", "backstop_min"), [
    ({"idle_backstop_s": None}, snap(), {}, None),
    ({"idle_backstop_s": None, "scale_min": 2, "scale_max": 3}, snap(), {"min_replica": 2, "max_replica": 3}, None),
    ({"idle_backstop_s": None, "scale_min": 1, "scale_max": 1}, snap(), {}, None),  # already so: nothing sent
    ({"idle_backstop_s": 900.0}, snap(stz=30), {"scale_to_zero_timeout": 15}, 15),
    ({"idle_backstop_s": 900.0}, snap(stz=15), {}, 15),  # already the backstop: set, nothing sent
    ({"idle_backstop_s": 10.0}, snap(), {"scale_to_zero_timeout": 1}, 1),  # at least a minute
    ({"idle_backstop_s": 900.0}, snap("running"), {}, None),  # kept running at the end: no backstop
    ({"idle_backstop_s": 900.0, "on_finish": "pause"}, snap("running"), {"scale_to_zero_timeout": 15}, 15),
])
def test_what_the_job_changes(tmp_path, settings, original, values, backstop_min):
    changes = ledger(tmp_path, **settings).changes(original)
    assert (changes.values, changes.backstop_min) == (values, backstop_min)


def test_the_backstop_note_says_when_it_cannot_work(tmp_path):
    events: list[str] = []
    ledger(tmp_path, events, idle_backstop_s=900.0, scale_min=0).changes(snap())
    assert events == []  # min_replica 0: the backstop scales it to zero
    ledger(tmp_path, events, idle_backstop_s=900.0, scale_min=2).changes(snap())
    assert len(events) == 1 and "with min_replica=2, a job killed with SIGKILL leaves it running" in events[0]


@pytest.mark.parametrize(("scale_min", "scale_max", "original", "target"), [
    (None, None, snap(min_replica=2, max_replica=4), 2),
    (3, None, snap(min_replica=1, max_replica=4), 3),
    (3, 2, snap(), 2),  # never more than the job's maximum
    (None, None, snap(min_replica=0, max_replica=1), 1),  # at least one replica to send to
    (5, None, snap(min_replica=0, max_replica=0), 5),  # no maximum said
])
def test_the_replicas_the_ready_wait_waits_for(tmp_path, scale_min, scale_max, original, target):
    assert ledger(tmp_path, scale_min=scale_min, scale_max=scale_max).min_target(original) == target


def test_the_users_settings_are_saved_before_a_change_and_only_then(tmp_path):
    running = snap("running", min_replica=1, max_replica=1, stz=None)
    book = ledger(tmp_path / "a", idle_backstop_s=None)
    start = book.start(running)  # nothing to change, nothing to resume: no file
    assert start.values == {} and not Path(book.state_path()).exists() and not book.saved.owned
    book = ledger(tmp_path / "b", idle_backstop_s=None, scale_min=2, scale_max=2)
    start = book.start(running)
    saved = json.loads(Path(book.state_path()).read_text())
    assert (saved["initial_state"], saved["min_replica"], saved["max_replica"]) == ("running", 1, 1)
    assert book.changed == {"min_replica": 2, "max_replica": 2} and book.saved.owned
    book = ledger(tmp_path / "c", idle_backstop_s=None)
    book.start(snap("paused"))  # a resume alone changes the endpoint: its state is saved to go back to
    assert json.loads(Path(book.state_path()).read_text())["initial_state"] == "paused"


def _left_by_a_dead_run(path: Path, *, initial_state: str = "paused", min_replica: int = 1, max_replica: int = 1,
                        stz: int | None = 30) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "endpoint": "ns/gen", "api_url": API, "initial_state": initial_state, "min_replica": min_replica,
        "max_replica": max_replica, "scale_to_zero_timeout": stz, "pid": os.getpid(),
        "host": socket.gethostname() + "-elsewhere",  # another host: its writer is not asked about
    }))


def test_a_killed_runs_settings_are_adopted_and_every_difference_is_put_back(tmp_path):
    events: list[str] = []
    book = ledger(tmp_path, events, idle_backstop_s=None, scale_min=2, scale_max=2)
    _left_by_a_dead_run(Path(book.state_path()), initial_state="paused", min_replica=0, max_replica=1, stz=30)
    # The killed run resumed it and set 2/2 with a 15-minute backstop: that is what the job finds.
    start = book.start(snap("running", min_replica=2, max_replica=2, stz=15))
    assert (start.original.min_replica, start.original.max_replica, start.original.scale_to_zero_timeout) == (0, 1, 30)
    assert book.initial_state == "paused" and book.final_action(start.original) == "pause"
    assert book.restore(start.original) == {"min_replica": 0, "max_replica": 1, "scale_to_zero_timeout": 30}
    assert any(e.startswith("an earlier run left ns/gen changed") for e in events)


def test_the_first_shard_carries_a_single_runs_host_record_into_the_shared_file(tmp_path):
    host_file = endpoint_state_path(API, "ns", "gen")  # batchrun's state folder (BATCHRUN_STATE_DIR in tests)
    _left_by_a_dead_run(host_file, initial_state="paused", min_replica=1, max_replica=1, stz=30)
    shared = SharedUse(tmp_path / "shared", "shard-00000-of-00002")
    book = SettingsLedger(Control(), LifecycleSettings(shared=shared, idle_backstop_s=None))
    start = book.start(snap("running", min_replica=2, max_replica=2, stz=15))
    assert book.state_path() == str(shared.settings_path)
    assert json.loads(shared.settings_path.read_text())["initial_state"] == "paused"
    assert not host_file.exists()  # the machine's record is done with
    assert book.final_action(start.original) == "pause"
    assert book.restore(start.original) == {"min_replica": 1, "max_replica": 1, "scale_to_zero_timeout": 30}
