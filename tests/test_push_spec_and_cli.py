"""output.push_to_hub in the spec, and `batchrun push` on the command line."""

from __future__ import annotations

import pytest
import yaml
from hubkit import REPO_ID
from jobkit import NS, TOKEN, cli, emulator, run, running_endpoint, write_spec, write_topics

from batchrun.errors import SpecError
from batchrun.spec import load_spec


def spec_with(tmp_path, push):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "task": "chat-completion", "input": {"parquet": "in.parquet"}, "prompt": {"template": "{x}"},
        "endpoint": {"url": "http://127.0.0.1:9"}, "output": {"path": "out/job", "push_to_hub": push},
    }))
    return path


def test_push_to_hub_keys_are_read_with_their_defaults(tmp_path):
    push = load_spec(spec_with(tmp_path, {"repo": "org/name", "every": "30m", "private": True})).output.push_to_hub
    assert (push.repo, push.config, push.split, push.every, push.private, push.include_failed) == (
        "org/name", "default", "train", 1800.0, True, False)


@pytest.mark.parametrize(("push", "key"), [
    ({"repo": "no-namespace"}, "output.push_to_hub.repo"),
    ({"repo": "org/name", "config": "has space"}, "output.push_to_hub.config"),
    ({"repo": "org/name", "every": "soon"}, "output.push_to_hub.every"),
    ({"repo": "org/name", "private": "yes"}, "output.push_to_hub.private"),
    ({"repo": "org/name", "unknown": 1}, "output.push_to_hub.unknown"),
    ({"config": "default"}, "output.push_to_hub.repo"),
])
def test_a_bad_push_to_hub_key_is_a_spec_error_naming_it(tmp_path, push, key):
    with pytest.raises(SpecError) as refused:
        load_spec(spec_with(tmp_path, push))
    assert key in str(refused.value)


def test_batchrun_push_publishes_an_output_and_says_what_it_did(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", 30))
        run(spec)
        out = str(tmp_path / "out" / "job")
        env = {"HF_TOKEN": TOKEN}
        done = cli("push", out, "--repo", REPO_ID, "--endpoint", emu.hub_url, env=env)
        assert done.returncode == 0, done.stderr
        assert f"pushed 1 new shard(s) and the card to {REPO_ID}" in done.stdout
        bad = cli("push", out, "--repo", "not a repo", "--endpoint", emu.hub_url, env=env)
        assert bad.returncode == 2 and bad.stderr.startswith("error: cannot push to the Hub:")
        assert "Traceback" not in bad.stderr and TOKEN not in done.stdout + done.stderr + bad.stderr
        assert len(emu.hub.commits_of(REPO_ID)) == 2


def test_batchrun_push_of_a_folder_that_is_not_an_output_is_one_clear_error(tmp_path):
    done = cli("push", str(tmp_path), "--repo", REPO_ID)
    assert done.returncode == 2 and "is not a batchrun output folder" in done.stderr
