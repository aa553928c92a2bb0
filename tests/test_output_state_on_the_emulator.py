"""Output state over a whole job on the emulator: a resumed run reads the shards' schema back."""

from __future__ import annotations

from batchrun.records import RowResult


def kept(position: int) -> dict:
    return {"prompt": f"prompt {position}", "lang": "en"}


def ok(position: int) -> RowResult:
    return RowResult(position, f"row-{position}", kept(position), {"generated_text": "hi", "prompt_tokens": 3}, 0.1, 1)


# --------------------------------------------------------------------------------------------------
# Kept input columns in failed shards


# --------------------------------------------------------------------------------------------------
# keep_columns is validated once, by preflight


# --------------------------------------------------------------------------------------------------
# A full disk


def test_a_resumed_run_reads_the_shards_schema_back_instead_of_building_it_again(tmp_path, monkeypatch):
    import glob

    import datasets
    import pyarrow.parquet as pq
    from jobkit import run, write_spec, write_topics

    # Retryable failures leave work for a second run.
    local = {"faults": {"rate_500": 0.3}, "latency_base_s": 0.002, "pending_s": 0.01, "initializing_s": 0.01}
    spec = write_spec(tmp_path, endpoint={"local": local}, input_path=write_topics(tmp_path / "in.parquet", 40),
                      retries={"max_attempts": 1, "budget_ratio": 1.0}, output={"shard_rows": 5})
    first, _ = run(spec)
    assert first.summary["rows"]["total_failed"] > 0
    out = tmp_path / "out" / "job"
    shards_before = set(glob.glob(str(out / "data" / "*.parquet")))

    def no_features(*args, **kwargs):  # deriving the features is what needs datasets
        raise AssertionError("the schema was built again")

    monkeypatch.setattr(datasets.Features, "from_arrow_schema", no_features)
    second, _ = run(spec)
    assert second.summary["rows"]["ok"] > 0  # the resumed run wrote rows
    new_shards = set(glob.glob(str(out / "data" / "*.parquet"))) - shards_before
    assert new_shards
    old = pq.read_schema(sorted(shards_before)[0])
    for path in new_shards:
        new = pq.read_schema(path)
        assert new.equals(old)  # the same columns and types
        assert new.metadata[b"huggingface"] == old.metadata[b"huggingface"]  # the same features
