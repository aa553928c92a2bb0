"""The bracket of the Endpoint interface (`batchrun endpoint up|down JOB.yaml`): each kind of endpoint
answers up() and down() with a BracketResult; a Dedicated endpoint is driven against the emulator."""

from __future__ import annotations

import asyncio

import pytest
from jobkit import NS, TOKEN, emulator, paused_endpoint

from batchrun.cli import _bracket_line
from batchrun.endpoints import DedicatedEndpoint, LifecycleSettings, LocalEndpoint, UrlEndpoint
from batchrun.endpoints.base import Bracketed, BracketResult
from batchrun.endpoints.control_plane import HfControlPlane
from batchrun.endpoints.local import local_endpoint_config
from batchrun.endpoints.shared_endpoint import BRACKET, SharedUse
from batchrun.stop import Stop


def test_a_url_and_the_emulator_have_nothing_to_bracket_and_say_why():
    url = UrlEndpoint("http://127.0.0.1:9/", token=None)  # nothing listens there: up() must not ask it
    local = LocalEndpoint(local_endpoint_config({}, job_name="job", task="text-generation"), LifecycleSettings(),
                          stop=Stop(), on_event=lambda message: None)
    for endpoint, why in ((url, "a url is sent to as it is"), (local, "the built-in emulator is started and stopped")):
        for result in (asyncio.run(endpoint.up()), asyncio.run(endpoint.down())):
            assert result.outcome is Bracketed.NOT_BRACKETED and result.ref == endpoint.ref
            assert result.note is not None and result.note.startswith(why)
    assert local.record.acquired_at is None  # no emulator was started


def dedicated(emu, folder, user: str = BRACKET) -> DedicatedEndpoint:
    control = HfControlPlane(name="gen", namespace=NS, token=TOKEN, api_url=emu.api_url)
    settings = LifecycleSettings(scale_min=2, scale_max=2, poll_interval_s=0.02, ready_timeout_s=10.0,
                                 idle_backstop_s=None, shared=SharedUse(folder, user))
    return DedicatedEndpoint(control, settings, token=TOKEN)


def test_a_dedicated_endpoint_is_held_up_until_down_and_put_back_once_no_shard_uses_it(tmp_path):
    folder = tmp_path / "shared"
    with emulator(paused_endpoint()) as emu:
        up = asyncio.run(dedicated(emu, folder).up())
        assert (up.outcome, up.ref) == (Bracketed.UP, f"{NS}/gen")
        assert (emu.state(NS, "gen").state, emu.state(NS, "gen").min_replica) == ("running", 2)
        shard = SharedUse(folder, "shard-00000-of-00002")
        shard.join(beat=False)
        down = asyncio.run(dedicated(emu, folder).down())  # another process, in real life
        assert down.outcome is Bracketed.IN_USE
        assert down.note is not None and "shard-00000-of-00002" in down.note
        assert emu.state(NS, "gen").state == "running"
        shard.leave()
        down = asyncio.run(dedicated(emu, folder).down())
        assert (down.outcome, down.final_action) == (Bracketed.PUT_BACK, "pause")
        state = emu.state(NS, "gen")
        assert (state.state, state.min_replica, state.max_replica) == ("paused", 1, 1)


def test_a_dedicated_endpoint_opened_for_a_run_refuses_to_be_the_bracket(tmp_path):
    with emulator(paused_endpoint()) as emu:
        endpoint = dedicated(emu, tmp_path / "shared", user="shard-00000-of-00001")
        with pytest.raises(ValueError, match="not opened as the bracket"):
            asyncio.run(endpoint.up())
        with pytest.raises(ValueError, match="not opened as the bracket"):
            asyncio.run(endpoint.down())
        assert [e for e in emu.control_log if e["method"] != "GET"] == []


@pytest.mark.parametrize(("result", "line"), [
    (BracketResult("ns/gen", Bracketed.UP),
     "ns/gen: ready; the job's shards share it until `batchrun endpoint down job.yaml`"),
    (BracketResult("ns/gen", Bracketed.IN_USE, final_action="left to the other users", note="used by shard-1"),
     "ns/gen: still in use, left to the last shard to put down: used by shard-1"),
    (BracketResult("ns/gen", Bracketed.PUT_BACK, final_action="pause"), "ns/gen: pause"),
    (BracketResult("ns/gen", Bracketed.PUT_BACK, final_action="keep", note="it was running"),
     "ns/gen: keep (it was running)"),
    (BracketResult("http://h/", Bracketed.NOT_BRACKETED, note="a url"), "http://h/: nothing to bracket (a url)"),
])
def test_what_the_command_says_of_each_outcome(result, line):
    assert _bracket_line(result, "job.yaml") == line
