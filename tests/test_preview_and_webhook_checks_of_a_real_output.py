"""preview of an output a real job wrote on the emulator still writes its page."""

from __future__ import annotations

from jobkit import NS, TOKEN, emulator, run, running_endpoint, write_spec, write_topics

from batchrun.cli import main


def test_preview_of_a_real_output_still_writes_its_page(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    input_path = write_topics(tmp_path / "topics.parquet", 3)
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path)
        assert run(spec)[0].exit_code == 0
    out = tmp_path / "out" / "job"
    assert main(["preview", str(out)]) == 0
    assert (out / "preview.html").is_file()
