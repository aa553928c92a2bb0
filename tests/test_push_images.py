"""An image job pushed to the emulated Hub: Image columns stay Image features, and the card shows thumbnails."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
from hubkit import REPO_ID, assert_exact, card_of, point_at_hub
from jobkit import TOKEN, emulator, run
from PIL import Image
from test_image_jobs import image_endpoint, image_job, url_of, write_prompts


def test_an_image_job_on_the_hub_loads_with_datasets_as_pil_images_equal_to_the_local_output(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(image_endpoint()) as emu:
        point_at_hub(monkeypatch, emu.hub_url)
        spec = image_job(tmp_path, url_of(emu), write_prompts(tmp_path / "in.parquet", 8),
                         output={"path": str(tmp_path / "out" / "img"), "shard_rows": 3,
                                 "push_to_hub": {"repo": REPO_ID, "endpoint": emu.hub_url}})
        outcome, _ = run(spec)
        assert outcome.exit_code == 0
        files = emu.hub.files(REPO_ID)
        loaded = datasets.load_dataset(REPO_ID, split="train", cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "out" / "img"
    assert_exact(files, out)
    meta, body = card_of(files)
    image_feature = next(f for f in meta["dataset_info"][0]["features"] if f["name"] == "image")
    assert image_feature["dtype"] == "image"
    local = {r["id"]: r for r in pq.read_table(sorted((out / "data").glob("*.parquet"))).to_pylist()}
    assert len(loaded) == len(local) == 8
    for row in loaded:
        assert isinstance(row["image"], Image.Image)
        expected = Image.open(io.BytesIO(local[row["id"]]["image"]["bytes"]))
        assert row["image"].tobytes() == expected.tobytes() and row["prompt"] == local[row["id"]]["prompt"]
    strip = Image.open(io.BytesIO(files["assets/default-samples.png"]))
    assert strip.height == 128 and "(assets/default-samples.png)" in body


def test_a_push_of_an_unchanged_image_output_commits_nothing(tmp_path, monkeypatch):
    from batchrun.publish import Target, push_output

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(image_endpoint()) as emu:
        spec = image_job(tmp_path, url_of(emu), write_prompts(tmp_path / "in.parquet", 4))
        run(spec)
        out = Path(tmp_path / "out" / "img")
        first = push_output(out, Target(repo=REPO_ID, endpoint=emu.hub_url), echo=lambda line: None)
        again = push_output(out, Target(repo=REPO_ID, endpoint=emu.hub_url), echo=lambda line: None)
        assert not first.up_to_date and again.up_to_date and again.commit == first.commit
        assert len(emu.hub.commits_of(REPO_ID)) == 2  # the repo's first commit, and the push
