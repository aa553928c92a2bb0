"""Storage Buckets on the emulated Hub, driven by huggingface_hub's bucket API and hf_xet (the Rust Xet client).

Every byte goes through the emulator's Xet CAS as on the Hub: xorbs and a shard up, a reconstruction and
xorb ranges down; ``/batch`` only names the hashes. The CAS's own log is the proof the client used it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import httpx2 as httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hubkit import point_at_hub
from jobkit import TOKEN, emulator

BUCKET = "bucket-test/outputs"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet-cache"))
    disable_progress_bars()
    with emulator(token=TOKEN) as emu:
        point_at_hub(monkeypatch, emu.hub_url)
        yield emu
    enable_progress_bars()


def api(emu):
    from huggingface_hub import HfApi

    return HfApi(endpoint=emu.hub_url, token=TOKEN)


def payload(size: int, seed: int = 3) -> bytes:
    """Random bytes then a repeated run: several chunks, some compressible."""
    rnd = random.Random(seed)
    return bytes(rnd.getrandbits(8) for _ in range(size // 2)) + b"batchrun " * (size // 18)


def cas_calls(emu, method: str, word: str) -> list[dict]:
    return [e for e in emu.emulator.hub.cas.log if e["method"] == method and word in e["path"]]


def test_bytes_round_trip_through_the_cas_with_the_real_client(hub, tmp_path):
    from huggingface_hub import HfFileSystem

    big, small = payload(400_000), b"one small record\n"
    url = api(hub).create_bucket(BUCKET)
    assert url.bucket_id == BUCKET
    api(hub).batch_bucket_files(BUCKET, add=[(big, "run/data/part-1.parquet"), (small, "run/state/c.json")])
    assert cas_calls(hub, "POST", "/v1/xorbs/default/") and cas_calls(hub, "POST", "/v1/shards")

    info = api(hub).bucket_info(BUCKET)
    assert (info.total_files, info.size) == (2, len(big) + len(small))
    listed = {f.path: f.size for f in api(hub).list_bucket_tree(BUCKET, prefix="run", recursive=True)
              if f.type == "file"}
    assert listed == {"run/data/part-1.parquet": len(big), "run/state/c.json": len(small)}
    assert [f.path for f in api(hub).get_bucket_paths_info(BUCKET, ["run/state/c.json", "run/nothing"])] == [
        "run/state/c.json"]

    api(hub).download_bucket_files(BUCKET, [("run/data/part-1.parquet", tmp_path / "big"),
                                            ("run/state/c.json", tmp_path / "small")])
    assert (tmp_path / "big").read_bytes() == big
    assert (tmp_path / "small").read_bytes() == small
    assert cas_calls(hub, "GET", "/v1/reconstructions/") and cas_calls(hub, "GET", "/fetch/")

    fs = HfFileSystem(endpoint=hub.hub_url, token=TOKEN)
    fs.get_file(f"buckets/{BUCKET}/run/data/part-1.parquet", str(tmp_path / "via-fs"))
    assert (tmp_path / "via-fs").read_bytes() == big


def test_a_listing_without_recursion_shows_folders_and_a_delete_removes_the_path(hub):
    api(hub).create_bucket(BUCKET)
    api(hub).batch_bucket_files(BUCKET, add=[(b"a", "p/a.json"), (b"b", "p/q/b.json"), (b"c", "p/q/r/c.json")])
    top = [(e.type, e.path) for e in api(hub).list_bucket_tree(BUCKET, prefix="p")]
    assert top == [("file", "p/a.json"), ("directory", "p/q")]
    api(hub).batch_bucket_files(BUCKET, delete=["p/q/b.json"])
    assert sorted(e.path for e in api(hub).list_bucket_tree(BUCKET, recursive=True) if e.type == "file") == [
        "p/a.json", "p/q/r/c.json"]
    api(hub).delete_bucket(BUCKET)
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError, match="404"):
        api(hub).bucket_info(BUCKET)


def test_a_batch_naming_a_hash_the_cas_does_not_hold_fails_that_line(hub):
    api(hub).create_bucket(BUCKET)
    line = json.dumps({"type": "addFile", "path": "x.bin", "xetHash": "ab" * 32, "mtime": 0}) + "\n"
    answer = httpx.post(f"{hub.hub_url}/api/buckets/{BUCKET}/batch", content=line.encode(),
                        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"})
    assert answer.status_code == 422
    assert answer.json()["failed"] == [{"path": "x.bin", "error": "xetHash not found in storage"}]
    assert list(api(hub).list_bucket_tree(BUCKET)) == []


def test_the_cas_takes_uploads_with_a_write_token_only(hub):
    api(hub).create_bucket(BUCKET)
    hub_headers = {"Authorization": f"Bearer {TOKEN}"}
    read = httpx.get(f"{hub.hub_url}/api/buckets/{BUCKET}/xet-read-token", headers=hub_headers).json()
    assert read["casUrl"] == f"{hub.hub_url}/xet-cas" and read["exp"] > 0
    xorb = f"{read['casUrl']}/v1/xorbs/default/{'00' * 32}"
    assert httpx.post(xorb, content=b"x").status_code == 401
    assert httpx.post(xorb, content=b"x", headers={"Authorization": f"Bearer {read['accessToken']}"}).status_code == 403
    assert httpx.get(f"{hub.hub_url}/api/buckets/{BUCKET}/xet-read-token").status_code == 401
