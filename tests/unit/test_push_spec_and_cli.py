"""output.push_to_hub in the spec, and `batchrun push` on the command line."""

from __future__ import annotations

import pytest
import yaml
from hubkit import REPO_ID
from jobkit import cli

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


def test_batchrun_push_of_a_folder_that_is_not_an_output_is_one_clear_error(tmp_path):
    done = cli("push", str(tmp_path), "--repo", REPO_ID)
    assert done.returncode == 2 and "is not a batchrun output folder" in done.stderr
