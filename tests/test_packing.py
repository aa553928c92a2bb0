"""Packing rows into requests: the controller of rows per request, TEI's refusals, the packing stage,
and reading a packed answer into one outcome per row."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import numpy as np
import pytest

from batchrun.errors import RequestFailed
from batchrun.packing import (
    DEFAULT_ROWS,
    PACK_OUTPUTS,
    Packer,
    RowsPerRequest,
    ServerLimits,
    TooLarge,
    make_pack,
    members,
    too_large,
)
from batchrun.records import Row
from batchrun.tasks import build_task


def rows(n: int) -> list[Row]:
    return [Row(i, f"r{i}", {"text": f"text {i}"}) for i in range(n)]


class Stream:
    """Rows as the reader hands them over: batches, with ``next_nowait`` inside a batch."""

    def __init__(self, items: list[Row], batch: int) -> None:
        self._batches = [iter(items[i:i + batch]) for i in range(0, len(items), batch)]
        self._batch: list[Row] | None = None
        self._current = iter(())

    def next_nowait(self) -> Row | None:
        return next(self._current, None)

    def __aiter__(self) -> AsyncIterator[Row]:
        return self

    async def __anext__(self) -> Row:
        row = next(self._current, None)
        while row is None:
            if not self._batches:
                raise StopAsyncIteration
            self._current = self._batches.pop(0)
            row = next(self._current, None)
        return row


async def drain(packer: Packer) -> list[tuple[int, ...]]:
    packs = []
    while (pack := packer.next_nowait()) is not None:
        packs.append(tuple(m.position for m in members(pack) or ()))
    async for pack in packer:
        packs.append(tuple(m.position for m in members(pack) or ()))
    return packs


def test_rows_per_request_come_from_the_spec_else_the_server_else_teis_default() -> None:
    assert RowsPerRequest().size == DEFAULT_ROWS
    assert RowsPerRequest(limits=ServerLimits(max_client_batch_size=12)).size == 12
    assert RowsPerRequest(max_rows=8, limits=ServerLimits(max_client_batch_size=12)).size == 8
    assert RowsPerRequest(max_rows=64, limits=ServerLimits(max_client_batch_size=12)).size == 12
    assert RowsPerRequest(max_rows=64).size == 64


def test_a_refusal_lowers_the_rows_to_the_limit_it_names_else_to_half() -> None:
    controller = RowsPerRequest(max_rows=64)
    controller.refused(64, TooLarge(server_max=20))
    assert controller.size == 20
    controller.refused(20, TooLarge())
    assert controller.size == 10
    controller.refused(10, TooLarge(input_too_long=True))  # one row too long: not the pack's size
    assert controller.size == 10


def test_the_input_budget_is_counted_in_rows() -> None:
    limits = ServerLimits.from_info({"max_concurrent_requests": 512, "max_client_batch_size": 32,
                                     "max_batch_tokens": 16384})
    assert limits == ServerLimits(32, 16384, 512)
    assert RowsPerRequest(limits=limits).requests_in_flight() == 16
    assert RowsPerRequest(limits=limits).max_tokens == 16384  # a pack fits one of TEI's forward passes
    assert RowsPerRequest(max_tokens=500, limits=limits).max_tokens == 500
    assert ServerLimits.from_info("not info") == ServerLimits()


@pytest.mark.parametrize(("status", "message", "expected"), [
    (422, "Validation: batch size 64 > maximum allowed batch size 32", TooLarge(server_max=32)),
    (413, "Validation: batch size 64 > maximum allowed batch size 16", TooLarge(server_max=16)),
    (422, "Validation: Input validation error: `inputs` must have less than 512 tokens. Given: 600",
     TooLarge(input_too_long=True)),
    (413, "Payload Too Large", TooLarge()),
    (422, "Validation: prompt_name `x` is not in the model's prompts", None),
    (400, "batch size 64 > maximum allowed batch size 32", None),
])
def test_teis_refusals_as_too_large_are_told_apart(status, message, expected) -> None:
    assert too_large(status, message) == expected


def test_the_packing_stage_groups_every_row_once_in_order() -> None:
    packer = Packer(Stream(rows(70), batch=25), RowsPerRequest(max_rows=16))
    packs = asyncio.run(drain(packer))
    assert [p for pack in packs for p in pack] == list(range(70))
    assert all(len(pack) <= 16 for pack in packs)
    assert len(packs) <= 8  # full packs but at the batches' ends and the last


def test_the_token_bound_closes_a_pack_before_it_overflows() -> None:
    items = [Row(i, i, {"text": "one two three four five six seven eight"}) for i in range(10)]  # 10 tokens each
    packer = Packer(Stream(items, batch=10), RowsPerRequest(max_rows=100, max_tokens=35),
                    text_of=lambda row: row.columns["text"])
    packs = asyncio.run(drain(packer))
    assert packs == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9,)]


def embedding_task():
    return build_task("feature-extraction", column="text")


def test_an_embedding_answer_is_one_outcome_per_row_and_its_dimension_is_held() -> None:
    task = embedding_task()
    pack = make_pack(tuple(rows(3)), ("a", "b", "c"))
    request = task.prepare(pack)
    assert request.path == "/embed" and request.payload == {"inputs": ["a", "b", "c"]}
    outcomes = task.parse(200, {}, json.dumps([[0.5, 1.0], [0.25, 2.0], [1.0, 1.0]]).encode())[PACK_OUTPUTS]
    assert [list(outcome["embedding"]) for outcome in outcomes] == [[0.5, 1.0], [0.25, 2.0], [1.0, 1.0]]
    assert outcomes[0]["embedding"].dtype == np.float32
    later = task.parse(200, {}, json.dumps([[0.5, 1.0, 3.0], [1.0, 2.0]]).encode())[PACK_OUTPUTS]  # ragged
    assert isinstance(later[0], RequestFailed) and later[0].error_type == "embedding_dimension"
    assert not later[0].retryable
    assert later[1] == {"embedding": [1.0, 2.0]}


def test_embeddings_that_are_not_numbers_are_left_for_the_sink_to_refuse() -> None:
    import pyarrow as pa

    from batchrun.tasks.tei import EMBEDDING_OUTPUT_SCHEMA

    outcomes = embedding_task().parse(200, {}, b'[[0.5, "x"], [1.0, 2.0]]')[PACK_OUTPUTS]
    assert outcomes == [{"embedding": [0.5, "x"]}, {"embedding": [1.0, 2.0]}]
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        pa.array([outcomes[0]["embedding"]], type=EMBEDDING_OUTPUT_SCHEMA.field("embedding").type)


def test_a_bad_embedding_answer_is_a_retryable_failure() -> None:
    task = embedding_task()
    with pytest.raises(RequestFailed) as bad:
        task.parse(200, {}, b'{"error": "CUDA error", "error_type": "Backend"}')
    assert bad.value.retryable


def test_classification_sends_each_text_as_a_list_of_one_not_as_a_pair() -> None:
    task = build_task("text-classification", column="text", parameters={"raw_scores": True})
    request = task.prepare(make_pack(tuple(rows(2)), (["a"], ["b"])))
    assert request.payload == {"raw_scores": True, "inputs": [["a"], ["b"]]}


def spec(**keys: object):
    from batchrun.spec import parse_spec

    data = {"task": "feature-extraction", "input": {"parquet": "in.parquet"}, "prompt": {"column": "text"},
            "endpoint": {"url": "http://127.0.0.1:8080"}, **keys}
    return parse_spec(data)


def test_the_spec_keys_of_packing_apply_to_the_tasks_that_pack() -> None:
    from batchrun.errors import SpecError

    assert spec(packing={"max_rows": 8, "max_tokens": 4096}).packing.max_rows == 8
    assert spec(embedding_dtype="float16").identity()["embedding_dtype"] == "float16"
    assert "embedding_dtype" not in spec().identity()  # float32: the identity other outputs already have
    with pytest.raises(SpecError, match="packing.max_rows"):
        spec(packing={"max_rows": 0})
    with pytest.raises(SpecError, match="packing"):
        spec(task="chat-completion", packing={"max_rows": 8})
    with pytest.raises(SpecError, match="embedding_dtype"):
        spec(embedding_dtype="int8")
    with pytest.raises(SpecError, match="embedding_dtype"):
        spec(task="text-classification", embedding_dtype="float16")


def test_rerank_needs_its_column_of_candidates_and_no_other_task_takes_one() -> None:
    from batchrun.errors import SpecError

    assert spec(task="rerank", prompt={"column": "q", "texts_column": "docs"}).prompt.texts_column == "docs"
    with pytest.raises(SpecError, match="prompt.texts_column"):
        spec(task="rerank")
    with pytest.raises(SpecError, match="prompt.texts_column"):
        spec(prompt={"column": "text", "texts_column": "docs"})


def test_a_limit_nobody_told_is_probed_upward_until_a_refusal_names_it() -> None:
    controller = RowsPerRequest()
    assert controller.probing and controller.size == DEFAULT_ROWS
    for _ in range(4):
        controller.answered(DEFAULT_ROWS)
    assert controller.size == 2 * DEFAULT_ROWS
    controller.answered(5)  # a pack short of rows (the input's end) says nothing
    for _ in range(4):
        controller.answered(64)
    assert controller.size == 128
    controller.refused(128, TooLarge(server_max=100))
    assert controller.size == 100 and not controller.probing
    for _ in range(8):
        controller.answered(100)
    assert controller.size == 100
    told = RowsPerRequest(limits=ServerLimits(max_client_batch_size=12))
    for _ in range(8):
        told.answered(12)
    assert told.size == 12
