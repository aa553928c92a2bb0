"""batchrun push against the emulated Hub: it publishes an output and says what it did."""

from __future__ import annotations

from hubkit import REPO_ID
from jobkit import NS, TOKEN, cli, emulator, run, running_endpoint, write_spec, write_topics


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
