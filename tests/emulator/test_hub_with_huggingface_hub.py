"""The emulated Hub, driven by huggingface_hub's and datasets' own clients, as a job uses them."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hubkit import card_of, point_at_hub
from jobkit import NS, TOKEN, cli_process, emulator, running_endpoint

REPO = "hub-test/topics"


def parquet_bytes(n: int) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.table({"id": [f"t{i:03d}" for i in range(n)], "topic": [f"topic {i}" for i in range(n)]}), out)
    return out.getvalue()


@pytest.fixture
def hub(monkeypatch):
    with emulator(token=TOKEN) as emu:
        point_at_hub(monkeypatch, emu.hub_url)
        yield emu


def api(emu):
    from huggingface_hub import HfApi

    return HfApi(endpoint=emu.hub_url, token=TOKEN)


def test_create_repo_repo_info_and_a_commit_against_the_parent_read(hub):
    from huggingface_hub import CommitOperationAdd

    url = api(hub).create_repo(REPO, repo_type="dataset")
    assert url.repo_id == REPO
    assert api(hub).create_repo(REPO, repo_type="dataset", exist_ok=True).repo_id == REPO
    info = api(hub).repo_info(REPO, repo_type="dataset")
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    commit = api(hub).create_commit(REPO, [CommitOperationAdd("data/a.parquet", parquet_bytes(3))],
                                    commit_message="add", repo_type="dataset", parent_commit=info.sha)
    assert api(hub).repo_info(REPO, repo_type="dataset").sha == commit.oid
    assert hub.hub.files(REPO)["data/a.parquet"] == parquet_bytes(3)


def test_a_commit_on_a_stale_parent_is_refused_with_412_and_changes_nothing(hub):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    api(hub).create_repo(REPO, repo_type="dataset")
    read = api(hub).repo_info(REPO, repo_type="dataset").sha
    moved = hub.hub.move_head(REPO)  # someone else commits
    with pytest.raises(HfHubHTTPError) as refused:
        api(hub).create_commit(REPO, [CommitOperationAdd("x.txt", b"x")], commit_message="late",
                               repo_type="dataset", parent_commit=read)
    assert refused.value.response.status_code == 412
    assert api(hub).repo_info(REPO, repo_type="dataset").sha == moved and "x.txt" not in hub.hub.files(REPO)


def test_writes_need_the_token_and_a_private_repo_is_hidden_without_it(hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(endpoint=hub.hub_url, token="hf_wrong_token").create_repo(REPO, repo_type="dataset")
    assert refused.value.response.status_code == 401
    api(hub).create_repo(REPO, repo_type="dataset", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.hub_url, token=False).repo_info(REPO, repo_type="dataset")


def test_the_tree_the_file_list_and_downloads_answer_as_the_hub_does(hub, tmp_path):
    from huggingface_hub import HfFileSystem, hf_hub_download

    hub.hub.seed(REPO, {"data/train-0.parquet": parquet_bytes(4), "README.md": b"# topics\n"})
    assert api(hub).list_repo_files(REPO, repo_type="dataset") == [".gitattributes", "README.md", "data/train-0.parquet"]
    top = {e.path: type(e).__name__ for e in api(hub).list_repo_tree(REPO, repo_type="dataset")}
    assert top == {"data": "RepoFolder", ".gitattributes": "RepoFile", "README.md": "RepoFile"}
    entry = next(iter(api(hub).list_repo_tree(REPO, path_in_repo="data", repo_type="dataset")))
    assert entry.size == len(parquet_bytes(4)) and entry.blob_id
    path = hf_hub_download(REPO, "data/train-0.parquet", repo_type="dataset", endpoint=hub.hub_url, token=TOKEN,
                           cache_dir=str(tmp_path))
    assert Path(path).read_bytes() == parquet_bytes(4)
    fs = HfFileSystem(endpoint=hub.hub_url, token=TOKEN)
    with fs.open(f"datasets/{REPO}/data/train-0.parquet", "rb") as f:
        f.seek(4)
        assert f.read(8) == parquet_bytes(4)[4:12]  # a ranged read


def test_datasets_loads_a_repo_by_its_id_from_the_emulated_hub(hub, tmp_path):
    import datasets

    card = yaml.safe_dump({"configs": [{"config_name": "default",
                                        "data_files": [{"split": "train", "path": "data/*.parquet"}]}]})
    hub.hub.seed(REPO, {"data/a.parquet": parquet_bytes(5), "README.md": f"---\n{card}---\n# topics\n".encode()})
    loaded = datasets.load_dataset(REPO, split="train", cache_dir=str(tmp_path))
    assert loaded["id"] == [f"t{i:03d}" for i in range(5)]
    streamed = datasets.load_dataset(REPO, split="train", streaming=True)
    assert [row["topic"] for row in streamed] == [f"topic {i}" for i in range(5)]


def test_a_job_reads_one_emulated_repo_and_pushes_to_another_offline_through_hf_endpoint(tmp_path):
    """As a user runs it: `batchrun run` in its own process, HF_ENDPOINT naming the emulator, nothing else."""
    with emulator(running_endpoint(), token=TOKEN) as emu:
        emu.hub.seed(REPO, {"data/train-00000.parquet": parquet_bytes(30)})
        spec = {
            "name": "from-hub", "task": "chat-completion",
            "input": {"dataset": {"path": REPO, "split": "train"}, "id_column": "id"},
            "prompt": {"template": "Write about {topic}."}, "parameters": {"max_tokens": 8, "seed": 1},
            "endpoint": {"url": emu.endpoint_url(NS, "gen")}, "request_timeout": "5s",
            "output": {"path": str(tmp_path / "out"), "shard_rows": 10, "push_to_hub": {"repo": "hub-test/answers"}},
        }
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(spec))
        # Online, but the only Hub there is is the emulator on loopback.
        env = {"HF_ENDPOINT": emu.hub_url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
               "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
        done = cli_process("run", str(path), "--progress", "off", env=env)
        assert done.returncode == 0, done.stderr
        files = emu.hub.files("hub-test/answers")
        again = cli_process("push", str(tmp_path / "out"), env=env)  # the repo comes from the spec
        assert again.returncode == 0, again.stderr
        assert "up to date" in again.stdout
    meta, body = card_of(files)
    assert meta["dataset_info"][0]["splits"][0]["num_examples"] == 30
    assert sum(1 for p in files if p.startswith("default/train-")) == 3
    assert TOKEN not in done.stderr + done.stdout + body


def test_hub_datasets_in_the_emulator_config_are_repos_from_the_start(tmp_path):
    from batchrun.emulator import EmulatorConfig, EmulatorThread

    (tmp_path / "in.parquet").write_bytes(parquet_bytes(2))
    config = EmulatorConfig.from_dict({"endpoints": [], "hub_datasets": {"demo/prompts": str(tmp_path / "in.parquet")}})
    with EmulatorThread(config) as emu:
        assert emu.hub.files("demo/prompts")["data/in.parquet"] == parquet_bytes(2)


def test_a_malformed_hub_datasets_key_is_refused_naming_it():
    from batchrun.emulator import EmulatorConfig, EmulatorConfigError

    with pytest.raises(EmulatorConfigError, match="hub_datasets"):
        EmulatorConfig.from_dict({"hub_datasets": {"no-slash": "x"}})


def test_a_commit_larger_than_one_mib_is_accepted(hub):
    # A realistic shard is megabytes; the control port once kept aiohttp's 1 MiB body limit and refused it (413).
    from huggingface_hub import CommitOperationAdd

    big = bytes(range(256)) * (3 * 4096)  # 3 MiB, base64-encoded in the commit's body
    api(hub).create_repo(REPO, repo_type="dataset")
    api(hub).create_commit(REPO, [CommitOperationAdd("data/big.bin", big)], commit_message="add", repo_type="dataset")
    assert hub.hub.files(REPO)["data/big.bin"] == big
