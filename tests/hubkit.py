"""Helpers for the Hub tests: point huggingface_hub and datasets at the emulated Hub, read what it holds."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

REPO_ID = "hub-test/answers"


def point_at_hub(monkeypatch, url: str) -> None:
    """Make huggingface_hub and datasets talk to ``url`` (they read HF_ENDPOINT at import), online."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", url)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", url + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)


def card_of(files: dict[str, bytes]) -> tuple[dict[str, Any], str]:
    """The README's YAML header and body."""
    text = files["README.md"].decode()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def shard_files(files: dict[str, bytes], config: str = "default", split: str = "train") -> list[str]:
    return sorted(p for p in files if p.startswith(f"{config}/{split}-") and p.endswith(".parquet"))


def rows_in(files: dict[str, bytes], paths: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(pq.read_table(io.BytesIO(files[path])).to_pylist())
    return rows


def local_shard_names(out: Path, kind: str = "data") -> list[str]:
    return sorted(p.name for p in (out / kind).glob("*.parquet"))


def expected_hub_names(out: Path, kind: str = "data", config: str = "default", split: str = "train") -> list[str]:
    """The files the output's shards become on the Hub (a split job's keep their shard's name)."""
    return sorted(f"{config}/{split}-{_hub_stem(name)}" for name in local_shard_names(out, kind))


def _hub_stem(name: str) -> str:
    """``part-00003-r2.parquet`` -> ``00003-r2.parquet``; ``shard-00001-of-00004-part-00003-r2.parquet`` ->
    ``shard-00001-of-00004-00003-r2.parquet``."""
    return name.replace("part-", "", 1)


def assert_exact(files: dict[str, bytes], out: Path, kind: str = "data", config: str = "default",
                 split: str = "train") -> None:
    """The repo holds every local shard once, byte for byte, nothing else in the config, and a card that says so."""
    names = expected_hub_names(out, kind, config, split)
    assert shard_files(files, config, split) == names
    for name in local_shard_names(out, kind):
        assert files[f"{config}/{split}-{_hub_stem(name)}"] == (out / kind / name).read_bytes()
    meta, _ = card_of(files)
    info = next(i for i in meta["dataset_info"] if i["config_name"] == config)
    split_info = next(s for s in info["splits"] if s["name"] == split)
    assert split_info["num_examples"] == len(rows_in(files, names))
