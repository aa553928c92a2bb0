"""The object store interface keeps its promises on a real S3-compatible server, a GCS emulator and a folder."""

import pytest
from gcskit import GCSServer
from s3kit import S3Server

from batchrun.errors import ObjectStoreError, OutputError, PreconditionFailed
from batchrun.output.stores import FolderStore, is_store_url, open_store


@pytest.fixture(scope="module")
def s3():
    server = S3Server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gcs():
    server = GCSServer.start()
    yield server
    server.stop()


@pytest.fixture(params=["s3", "gcs", "folder"])
def store(request, tmp_path, monkeypatch):
    if request.param == "folder":
        return FolderStore(tmp_path / "store")
    server = request.getfixturevalue(request.param)
    for name, value in server.environ().items():
        monkeypatch.setenv(name, value)
    return open_store(server.bucket())


def test_create_if_absent_refuses_a_second_writer(store):
    store.put_if_absent("state/commits/a.json", b"first")
    with pytest.raises(PreconditionFailed):
        store.put_if_absent("state/commits/a.json", b"second")
    assert store.get("state/commits/a.json")[0] == b"first"


def test_replace_if_unchanged_refuses_a_stale_version(store):
    first = store.put_if_absent("lease", b"1")
    second = store.put_if_match("lease", b"2", first)
    with pytest.raises(PreconditionFailed):
        store.put_if_match("lease", b"3", first)
    store.put_if_match("lease", b"3", second)
    assert store.get("lease")[0] == b"3"


def test_listing_delete_upload_and_missing_keys(store, tmp_path):
    part = tmp_path / "part.parquet"
    part.write_bytes(b"x" * 1000)
    store.upload("data/part-1.parquet", part)
    store.put("data/part-2.parquet", b"yy")
    store.put("state/job.json", b"{}")
    assert [(o.key, o.size) for o in store.list("data")] == [("data/part-1.parquet", 1000), ("data/part-2.parquet", 2)]
    store.delete("data/part-1.parquet")
    store.delete("data/never-there")
    assert [o.key for o in store.list("data")] == ["data/part-2.parquet"]
    assert store.list("nothing") == []
    with pytest.raises(ObjectStoreError) as caught:
        store.get("data/part-1.parquet")
    assert caught.value.key == "data/part-1.parquet" and caught.value.missing


def test_store_urls_are_told_from_local_paths():
    assert is_store_url("s3://bucket/out") and is_store_url("gs://bucket/out")
    assert not is_store_url("out/job") and not is_store_url("/abs/out")
    with pytest.raises(OutputError, match="s3://"):
        open_store("ftp://host/out")


def test_gcs_conditions_travel_as_generation_preconditions_the_server_checks(gcs, monkeypatch):
    for name, value in gcs.environ().items():
        monkeypatch.setenv(name, value)
    store = open_store(gcs.bucket())
    sent = len(gcs.bridge.conditions)
    first = store.put_if_absent("lease", b"1")
    assert first.version and gcs.bridge.conditions[sent:] == ["0"]  # create-if-absent: ifGenerationMatch=0
    second = store.put_if_match("lease", b"2", first)
    assert gcs.bridge.conditions[sent + 1 :] == [first.version] and second.version != first.version
    with pytest.raises(PreconditionFailed):  # the server's own 412, for the generation that is gone
        store.put_if_match("lease", b"3", first)
    assert gcs.read(store.url, "lease") == b"2"
