"""Input sources: every kind reads the same rows in the same order, streamed, with clear errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import sources
from batchrun.errors import InputError
from batchrun.records import Row
from batchrun.sources import Source, open_source
from batchrun.spec import DatasetSpec, InputSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may reach the Hub; `datasets` must work from local files alone."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def parquet_input(path, **kw) -> InputSpec:
    return InputSpec(kind="parquet", path=str(path), **kw)


def jsonl_input(path, **kw) -> InputSpec:
    return InputSpec(kind="jsonl", path=str(path), **kw)


def dataset_input(path, *, split="train", id_column=None, limit=None, **config) -> InputSpec:
    return InputSpec(
        kind="dataset", dataset=DatasetSpec(path=str(path), split=split, **config), id_column=id_column, limit=limit
    )


def write_parquet(path: Path, ids, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"id": ids, "topic": columns.pop("topic", [f"topic {i}" for i in ids]), **columns}
    pq.write_table(pa.table(data), path)
    return path


def write_jsonl(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def all_rows(source: Source, batch_size: int = 1024) -> list[Row]:
    return [row for batch in source.batches(batch_size) for row in batch]


# --- Parquet ------------------------------------------------------------------------------------


def test_a_parquet_file_gives_rows_with_positions_ids_and_all_columns(tmp_path):
    write_parquet(tmp_path / "p.parquet", [10, 11, 12])
    source = open_source(parquet_input("p.parquet", id_column="id"))
    rows = all_rows(source)
    assert rows == [
        Row(position=0, id=10, columns={"id": 10, "topic": "topic 10"}),
        Row(position=1, id=11, columns={"id": 11, "topic": "topic 11"}),
        Row(position=2, id=12, columns={"id": 12, "topic": "topic 12"}),
    ]
    assert source.count() == 3
    assert source.schema.names == ["id", "topic"]
    assert source.description == "parquet: p.parquet (1 file, 3 rows)"
    assert isinstance(source, Source)


def test_without_an_id_column_the_id_is_the_position(tmp_path):
    write_parquet(tmp_path / "p.parquet", [7, 8])
    assert [(r.position, r.id) for r in all_rows(open_source(parquet_input("p.parquet")))] == [(0, 0), (1, 1)]


def test_a_parquet_folder_is_read_in_sorted_path_order_skipping_hidden_files(tmp_path):
    write_parquet(tmp_path / "data" / "b" / "part-0.parquet", [3, 4])
    write_parquet(tmp_path / "data" / "a.parquet", [1, 2])
    write_parquet(tmp_path / "data" / "c.parquet", [5])
    (tmp_path / "data" / "_SUCCESS").write_text("")
    write_parquet(tmp_path / "data" / "_tmp" / "z.parquet", [99])
    (tmp_path / "data" / "notes.txt").write_text("not data")
    source = open_source(parquet_input("data", id_column="id"))
    assert [r.id for r in all_rows(source)] == [1, 2, 3, 4, 5]
    assert [r.position for r in all_rows(source, batch_size=2)] == [0, 1, 2, 3, 4]
    assert source.count() == 5 and "3 files" in source.description


def test_a_parquet_glob_matches_files_in_sorted_order(tmp_path):
    for name, ids in [("x-2.parquet", [3]), ("x-1.parquet", [1, 2]), ("y.parquet", [9])]:
        write_parquet(tmp_path / "in" / name, ids)
    source = open_source(parquet_input("in/x-*.parquet", id_column="id"))
    assert [r.id for r in all_rows(source)] == [1, 2, 3]


def test_limit_stops_after_that_many_rows_across_files(tmp_path):
    write_parquet(tmp_path / "d" / "a.parquet", [1, 2, 3])
    write_parquet(tmp_path / "d" / "b.parquet", [4, 5, 6])
    source = open_source(parquet_input("d", id_column="id", limit=4))
    assert [r.id for r in all_rows(source, batch_size=2)] == [1, 2, 3, 4]
    assert [r.id for r in all_rows(source, batch_size=100)] == [1, 2, 3, 4]
    assert source.count() == 4


def test_batches_hold_at_most_batch_size_rows_and_order_is_repeatable(tmp_path):
    write_parquet(tmp_path / "p.parquet", list(range(25)))
    source = open_source(parquet_input("p.parquet", id_column="id"))
    sizes = [len(batch) for batch in source.batches(10)]
    assert sizes == [10, 10, 5]
    assert all_rows(source, 10) == all_rows(source, 7) == all_rows(open_source(parquet_input("p.parquet", id_column="id")), 3)


def test_a_missing_parquet_path_names_the_path_and_the_working_directory(tmp_path):
    with pytest.raises(InputError) as info:
        open_source(parquet_input("nowhere/prompts.parquet"))
    assert "'nowhere/prompts.parquet'" in str(info.value) and str(tmp_path) in str(info.value)


def test_a_glob_that_matches_nothing_says_so(tmp_path):
    with pytest.raises(InputError, match="matches no files"):
        open_source(parquet_input("in/*.parquet"))


def test_a_folder_without_parquet_files_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        open_source(parquet_input("empty"))


@pytest.mark.parametrize("content", [b"", b"this is not parquet at all", b"PAR1" + b"\0" * 64])
def test_an_unreadable_parquet_file_is_an_input_error_naming_it(tmp_path, content):
    (tmp_path / "bad.parquet").write_bytes(content)
    with pytest.raises(InputError, match=r"bad\.parquet"):
        open_source(parquet_input("bad.parquet"))


def test_a_parquet_file_cut_short_is_refused_before_reading_rows(tmp_path):
    data = write_parquet(tmp_path / "p.parquet", list(range(100))).read_bytes()
    (tmp_path / "p.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"p\.parquet"):
        open_source(parquet_input("p.parquet"))


def test_parquet_files_with_different_columns_are_refused_naming_both(tmp_path):
    write_parquet(tmp_path / "d" / "a.parquet", [1])
    write_parquet(tmp_path / "d" / "b.parquet", [2], extra=["x"])
    with pytest.raises(InputError, match=r"b\.parquet.*a\.parquet"):
        open_source(parquet_input("d"))


def test_a_missing_id_column_lists_the_available_columns(tmp_path):
    write_parquet(tmp_path / "p.parquet", [1])
    with pytest.raises(InputError) as info:
        open_source(parquet_input("p.parquet", id_column="row_id"))
    message = str(info.value)
    assert message.startswith("input.id_column:") and "'row_id'" in message and "id, topic" in message


def test_keep_columns_are_left_to_the_job_preflight_to_check(tmp_path):
    write_parquet(tmp_path / "p.parquet", [1])
    source = open_source(parquet_input("p.parquet", keep_columns=("topik",)))
    assert source.schema.names == ["id", "topic"]


def test_an_id_column_must_hold_integers_or_strings(tmp_path):
    write_parquet(tmp_path / "p.parquet", [1], score=[0.5])
    with pytest.raises(InputError, match="integers or strings"):
        open_source(parquet_input("p.parquet", id_column="score"))


def test_a_null_id_is_an_input_error_with_its_row(tmp_path):
    write_parquet(tmp_path / "p.parquet", [1, None, 3])
    source = open_source(parquet_input("p.parquet", id_column="id"))
    with pytest.raises(InputError, match="null at row 1"):
        source.find_duplicate_ids()
    with pytest.raises(InputError, match="null at row 1"):
        all_rows(source)


def test_image_structs_in_parquet_stay_raw_bytes(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"id": [1], "image": pa.array([{"bytes": b"\x89PNG", "path": None}], image_type)})
    pq.write_table(table, tmp_path / "img.parquet")
    (row,) = all_rows(open_source(parquet_input("img.parquet")))
    assert row.columns["image"] == {"bytes": b"\x89PNG", "path": None}


# --- duplicate ids ------------------------------------------------------------------------------


@pytest.fixture(params=["exact", "hashed"])
def id_scan(request, monkeypatch):
    """Each duplicate-id test runs both ways: counted exactly (small inputs) and by hashes (large ones)."""
    if request.param == "hashed":
        monkeypatch.setattr(sources._base, "EXACT_ID_SCAN_ROWS", 0)
    return request.param


def test_duplicate_integer_ids_are_found_across_files(tmp_path, id_scan):
    write_parquet(tmp_path / "d" / "a.parquet", [1, 2, 3])
    write_parquet(tmp_path / "d" / "b.parquet", [4, 2, 5, 5])
    assert sorted(open_source(parquet_input("d", id_column="id")).find_duplicate_ids()) == [2, 5]


def test_unique_ids_report_no_duplicates(tmp_path, id_scan):
    write_parquet(tmp_path / "p.parquet", list(range(1000)))
    assert open_source(parquet_input("p.parquet", id_column="id")).find_duplicate_ids() == []


def test_positional_ids_never_have_duplicates(tmp_path):
    write_parquet(tmp_path / "p.parquet", [1, 1])
    assert open_source(parquet_input("p.parquet")).find_duplicate_ids() == []


def test_duplicates_beyond_the_limit_do_not_count(tmp_path, id_scan):
    write_parquet(tmp_path / "p.parquet", [1, 2, 3, 1])
    assert open_source(parquet_input("p.parquet", id_column="id", limit=3)).find_duplicate_ids() == []
    assert open_source(parquet_input("p.parquet", id_column="id", limit=4)).find_duplicate_ids() == [1]


def test_duplicate_string_ids_are_found_in_jsonl(tmp_path, id_scan):
    write_jsonl(tmp_path / "q.jsonl", [{"qid": f"q{i}", "q": "?"} for i in [1, 2, 3, 2, 4, 1]])
    assert sorted(open_source(jsonl_input("q.jsonl", id_column="qid")).find_duplicate_ids()) == ["q1", "q2"]


def test_duplicate_string_ids_are_found_in_parquet(tmp_path, id_scan):
    write_parquet(tmp_path / "d" / "a.parquet", ["a", "b", "c"])
    write_parquet(tmp_path / "d" / "b.parquet", ["d", "b", "é", "é"])
    assert sorted(open_source(parquet_input("d", id_column="id")).find_duplicate_ids()) == ["b", "é"]
    write_parquet(tmp_path / "u.parquet", [f"row-{i}" for i in range(1000)])
    assert open_source(parquet_input("u.parquet", id_column="id")).find_duplicate_ids() == []


def test_a_hash_collision_is_not_reported_as_a_duplicate(tmp_path, monkeypatch):
    import numpy as np

    # Every id hashes alike: only the confirming pass can tell real duplicates from collisions.
    monkeypatch.setattr(sources._base, "EXACT_ID_SCAN_ROWS", 0)
    monkeypatch.setattr(sources._base, "_hash_ids", lambda chunk: np.zeros(len(chunk), dtype=np.uint64))
    write_parquet(tmp_path / "p.parquet", [1, 2, 3, 3])
    assert open_source(parquet_input("p.parquet", id_column="id")).find_duplicate_ids() == [3]
    write_parquet(tmp_path / "u.parquet", [1, 2, 3])
    assert open_source(parquet_input("u.parquet", id_column="id")).find_duplicate_ids() == []


def test_only_a_few_duplicates_are_reported(tmp_path, id_scan):
    write_parquet(tmp_path / "p.parquet", list(range(50)) * 2)
    found = open_source(parquet_input("p.parquet", id_column="id")).find_duplicate_ids()
    assert len(found) == sources.MAX_DUPLICATES_REPORTED and set(found) <= set(range(50))


# --- fingerprints -------------------------------------------------------------------------------


def test_the_fingerprint_is_stable_when_the_input_is_unchanged(tmp_path):
    write_parquet(tmp_path / "d" / "a.parquet", [1, 2])
    assert open_source(parquet_input("d")).fingerprint() == open_source(parquet_input("d")).fingerprint()


def test_the_fingerprint_survives_moving_the_input_and_ignores_the_limit(tmp_path):
    write_parquet(tmp_path / "d" / "a.parquet", [1, 2])
    before = open_source(parquet_input("d", limit=1)).fingerprint()
    shutil.copytree(tmp_path / "d", tmp_path / "elsewhere" / "copy")  # new mtimes, new place
    assert open_source(parquet_input("elsewhere/copy", limit=2)).fingerprint() == before
    assert open_source(parquet_input(tmp_path / "elsewhere" / "copy")).fingerprint() == before


def test_the_fingerprint_changes_with_the_content_or_the_id_column(tmp_path):
    write_parquet(tmp_path / "a.parquet", [1, 2])
    before = open_source(parquet_input("a.parquet")).fingerprint()
    assert open_source(parquet_input("a.parquet", id_column="id")).fingerprint() != before
    write_parquet(tmp_path / "a.parquet", [1, 3])
    assert open_source(parquet_input("a.parquet")).fingerprint() != before


def test_a_jsonl_fingerprint_changes_when_one_character_changes(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"q": "abc"}])
    before = open_source(jsonl_input("q.jsonl")).fingerprint()
    write_jsonl(tmp_path / "q.jsonl", [{"q": "abd"}])
    assert open_source(jsonl_input("q.jsonl")).fingerprint() != before


# --- JSONL --------------------------------------------------------------------------------------


def test_jsonl_rows_stream_with_an_inferred_schema_and_missing_keys_as_none(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"qid": "a", "question": "why?"}, "", {"qid": "b", "n": 2}])
    source = open_source(jsonl_input("q.jsonl", id_column="qid"))
    assert source.schema == pa.schema([("qid", pa.string()), ("question", pa.string()), ("n", pa.int64())])
    assert all_rows(source) == [
        Row(position=0, id="a", columns={"qid": "a", "question": "why?", "n": None}),
        Row(position=1, id="b", columns={"qid": "b", "question": None, "n": 2}),
    ]
    assert source.count() == 2


def test_a_malformed_jsonl_line_names_its_line_number(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"q": "fine"}, {"q": "fine"}, '{"q": "broken'])
    with pytest.raises(InputError, match=r"q\.jsonl, line 3: not valid JSON"):
        open_source(jsonl_input("q.jsonl"))


def test_a_malformed_line_far_into_the_input_is_found_when_it_is_opened(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [*({"q": i} for i in range(1500)), "not json"])
    with pytest.raises(InputError, match="line 1501"):
        open_source(jsonl_input("q.jsonl"))


def test_a_jsonl_line_that_is_not_an_object_is_refused(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [[1, 2]])
    with pytest.raises(InputError, match="line 1: expected a JSON object"):
        open_source(jsonl_input("q.jsonl"))


def test_jsonl_limit_and_count(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"i": i} for i in range(10)])
    source = open_source(jsonl_input("q.jsonl", limit=4))
    assert [r.columns["i"] for r in all_rows(source, 3)] == [0, 1, 2, 3] and source.count() == 4


# --- JSONL types are settled over the whole input, so every row fits the output schema -------------


def test_ids_that_turn_from_integers_to_strings_late_make_a_string_id_column(tmp_path):
    ids = [*range(1500), "a", "b"]
    write_jsonl(tmp_path / "q.jsonl", [{"id": i, "q": "x"} for i in ids])
    source = open_source(jsonl_input("q.jsonl", id_column="id"))
    assert source.schema.field("id").type == pa.string()
    rows = all_rows(source, 500)
    assert [r.id for r in rows] == [str(i) for i in ids]
    assert all(isinstance(r.columns["id"], str) for r in rows)
    # The rows fit the schema the output is built from.
    assert pa.Table.from_pylist([r.columns for r in rows], schema=source.schema).num_rows == len(ids)


def test_an_integer_id_and_its_decimal_text_are_the_same_id(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"id": 7}, {"id": "7"}, {"id": "x"}])
    assert open_source(jsonl_input("q.jsonl", id_column="id")).find_duplicate_ids() == ["7"]


def test_a_kept_column_that_turns_from_integers_to_strings_becomes_a_string_column(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [*({"code": i} for i in range(1200)), {"code": "A7"}])
    source = open_source(jsonl_input("q.jsonl"))
    assert source.schema.field("code").type == pa.string()
    values = [r.columns["code"] for r in all_rows(source)]
    assert values[:3] == ["0", "1", "2"] and values[-1] == "A7"


def test_integers_and_decimals_in_one_column_become_float64(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"x": 1}, {"x": 2.5}, {"x": None}])
    source = open_source(jsonl_input("q.jsonl"))
    assert source.schema.field("x").type == pa.float64()
    values = [r.columns["x"] for r in all_rows(source)]
    assert values == [1.0, 2.5, None] and isinstance(values[0], float)


def test_values_with_no_common_type_become_their_json_text(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"m": [1, 2]}, {"m": "two"}, {"m": {"a": True}}, {"m": 2**70}, {"m": [1, "x"]}])
    source = open_source(jsonl_input("q.jsonl"))
    assert source.schema.field("m").type == pa.string()
    assert [r.columns["m"] for r in all_rows(source)] == ["[1, 2]", "two", '{"a": true}', str(2**70), '[1, "x"]']


def test_nested_values_get_the_type_they_all_unify_to(tmp_path, monkeypatch):
    monkeypatch.setattr(sources._jsonl_types, "JSONL_NESTED_SAMPLE", 2)
    write_jsonl(tmp_path / "q.jsonl", [{"t": {"a": 1}}, {"t": {"a": 2}}, {"t": {"a": 2.5, "b": "x"}}, {"t": None}])
    source = open_source(jsonl_input("q.jsonl"))
    assert source.schema.field("t").type == pa.struct([("a", pa.float64()), ("b", pa.string())])
    table = pa.Table.from_pylist([r.columns for r in all_rows(source)], schema=source.schema)
    assert table.column("t").to_pylist()[2] == {"a": 2.5, "b": "x"}


def test_a_key_that_first_appears_late_is_a_column(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [*({"q": "x"} for _ in range(1200)), {"q": "y", "extra": 3}])
    source = open_source(jsonl_input("q.jsonl"))
    assert source.schema.names == ["q", "extra"] and all_rows(source)[-1].columns == {"q": "y", "extra": 3}


def test_a_large_jsonl_input_is_counted_by_the_open_scan(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"i": i} for i in range(3000)])
    assert open_source(jsonl_input("q.jsonl")).count() == 3000


def test_a_missing_jsonl_id_column_lists_the_available_columns(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"qid": "a", "question": "?"}])
    with pytest.raises(InputError, match="available columns: qid, question"):
        open_source(jsonl_input("q.jsonl", id_column="id"))


def test_a_jsonl_folder_reads_its_files_in_order(tmp_path):
    write_jsonl(tmp_path / "j" / "2.jsonl", [{"i": 2}])
    write_jsonl(tmp_path / "j" / "1.jsonl", [{"i": 1}])
    assert [r.columns["i"] for r in all_rows(open_source(jsonl_input("j")))] == [1, 2]


# --- datasets -----------------------------------------------------------------------------------


def test_datasets_data_files_are_streamed_in_order(tmp_path):
    write_parquet(tmp_path / "d" / "a.parquet", [1, 2])
    write_parquet(tmp_path / "d" / "b.parquet", [3])
    source = open_source(dataset_input("parquet", data_files=["d/a.parquet", "d/b.parquet"], id_column="id"))
    assert [(r.position, r.id) for r in all_rows(source, 2)] == [(0, 1), (1, 2), (2, 3)]
    assert source.schema.names == ["id", "topic"]
    assert "streamed" in source.description
    assert source.find_duplicate_ids() == []


def test_a_local_folder_of_parquet_files_is_a_dataset(tmp_path):
    write_parquet(tmp_path / "folder" / "train-0.parquet", [1, 2, 3])
    source = open_source(dataset_input("folder", id_column="id", limit=2))
    assert [r.id for r in all_rows(source)] == [1, 2]


def test_a_local_folder_of_csv_files_gets_its_schema_by_peeking(tmp_path):
    (tmp_path / "csvs").mkdir()
    (tmp_path / "csvs" / "data.csv").write_text("qid,question\nq1,why?\nq2,how?\nq1,again?\n")
    source = open_source(dataset_input("csvs", id_column="qid"))
    assert source.schema.names == ["qid", "question"]
    assert [r.columns["question"] for r in all_rows(source)] == ["why?", "how?", "again?"]
    assert source.find_duplicate_ids() == ["q1"]


def test_a_streamed_dataset_fingerprint_follows_the_files_not_the_folder(tmp_path):
    write_parquet(tmp_path / "folder" / "train-0.parquet", [1, 2, 3])
    before = open_source(dataset_input("folder")).fingerprint()
    assert open_source(dataset_input("folder")).fingerprint() == before
    shutil.copytree(tmp_path / "folder", tmp_path / "moved")
    assert open_source(dataset_input("moved")).fingerprint() == before
    write_parquet(tmp_path / "folder" / "train-0.parquet", [1, 2, 4])
    assert open_source(dataset_input("folder")).fingerprint() != before


def test_a_dataset_that_cannot_be_found_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot open 'no/such-dataset-here'"):
        open_source(dataset_input("no/such-dataset-here"))


def test_a_missing_split_is_an_input_error(tmp_path):
    write_parquet(tmp_path / "folder" / "train-0.parquet", [1])
    with pytest.raises(InputError):
        open_source(dataset_input("folder", split="validation"))


def save_to_disk(folder: Path, n: int = 30, with_image: bool = False):
    import datasets
    from PIL import Image

    datasets.disable_progress_bars()
    data = {"title": [f"t{i}" for i in range(n)], "theme": [f"theme {i % 3}" for i in range(n)]}
    features = {"title": datasets.Value("string"), "theme": datasets.Value("string")}
    if with_image:
        buffer = io.BytesIO()
        Image.new("RGB", (2, 2), "red").save(buffer, "PNG")
        data["image"] = [{"bytes": buffer.getvalue(), "path": None}] * n
        features["image"] = datasets.Image()
    dataset = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    dataset.save_to_disk(str(folder))
    return dataset


def test_a_save_to_disk_folder_is_read_from_its_arrow_table(tmp_path):
    save_to_disk(tmp_path / "saved", n=30)
    source = open_source(dataset_input("saved", id_column="title", limit=25))
    rows = all_rows(source, batch_size=10)
    assert [r.position for r in rows] == list(range(25))
    assert rows[3] == Row(position=3, id="t3", columns={"title": "t3", "theme": "theme 0"})
    assert source.count() == 25 and "save_to_disk" in source.description
    assert source.find_duplicate_ids() == []


def test_image_columns_from_datasets_stay_raw_and_are_never_decoded(tmp_path):
    save_to_disk(tmp_path / "saved", n=3, with_image=True)
    source = open_source(dataset_input("saved"))
    assert source.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    image = all_rows(source)[0].columns["image"]
    assert isinstance(image, dict) and image["bytes"].startswith(b"\x89PNG")
    # The same through the streaming path, from Parquet that carries the Image feature.
    import datasets

    datasets.load_from_disk(str(tmp_path / "saved")).to_parquet(str(tmp_path / "img.parquet"))
    streamed = open_source(dataset_input("parquet", data_files="img.parquet"))
    assert all_rows(streamed)[0].columns["image"]["bytes"].startswith(b"\x89PNG")


def test_a_saved_dataset_dict_is_read_by_split(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"x": [1, 2]}), "test": datasets.Dataset.from_dict({"x": [3]})}
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert [r.columns["x"] for r in all_rows(open_source(dataset_input("dd", split="test")))] == [3]
    with pytest.raises(InputError, match=r"no split 'validation'.*test, train"):
        open_source(dataset_input("dd", split="validation"))


def test_a_saved_dataset_refuses_load_dataset_options_it_would_ignore(tmp_path):
    save_to_disk(tmp_path / "saved", n=2)
    with pytest.raises(InputError, match="revision do not apply"):
        open_source(dataset_input("saved", revision="main"))


def test_a_saved_dataset_fingerprint_survives_a_copy(tmp_path):
    save_to_disk(tmp_path / "saved", n=5)
    before = open_source(dataset_input("saved")).fingerprint()
    shutil.copytree(tmp_path / "saved", tmp_path / "copy")
    assert open_source(dataset_input("copy")).fingerprint() == before


def test_duplicate_ids_in_a_saved_dataset_are_found(tmp_path):
    save_to_disk(tmp_path / "saved", n=6)
    assert sorted(open_source(dataset_input("saved", id_column="theme")).find_duplicate_ids()) == [
        "theme 0", "theme 1", "theme 2",
    ]  # fmt: skip


# --- the shipped samples ------------------------------------------------------------------------


def test_the_sample_inputs_open_and_have_unique_ids(monkeypatch):
    monkeypatch.chdir(REPO)
    prompts = open_source(parquet_input("sample_data/prompts.parquet", id_column="id"))
    questions = open_source(jsonl_input("sample_data/questions.jsonl", id_column="qid"))
    haiku = open_source(dataset_input("sample_data/haiku_dataset"))
    assert (prompts.count(), questions.count(), haiku.count()) == (200, 50, 100)
    assert prompts.find_duplicate_ids() == [] and questions.find_duplicate_ids() == []
    assert len({r.columns["topic"] for r in all_rows(prompts)}) > 100  # varied topics
    for path in (REPO / "sample_data").rglob("*"):
        assert not path.is_file() or path.stat().st_size < 100_000, path


