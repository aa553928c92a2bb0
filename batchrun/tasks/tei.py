"""Text Embeddings Inference: embeddings (``/embed``, ``/v1/embeddings``), reranking (``/rerank``) and
classification (``/predict``).

Embedding and classification send several rows per request (:mod:`batchrun.packing`): a request
is built from a pack's members (``inputs`` is their list of texts), and the answer is read into one
outcome per member, under :data:`~batchrun.packing.PACK_OUTPUTS`. A rerank row is already a batch (a
query and its candidate texts) and goes alone. TEI's own parameters (``truncate``, ``normalize``,
``prompt_name``, ``raw_scores``, ``truncation_direction``, ``dimensions``) are passed through at the
top level of the body, as TEI reads them.

An embedding's dimension is taken from the first answer and held for the whole job (a resumed run
holds the one its summary.json records): a vector of another length is a failure record
(``embedding_dimension``), never a row of another shape. ``batchrun push`` declares the column as a
fixed-size ``Sequence(Value("float32"), length=D)``.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from batchrun.errors import RequestFailed
from batchrun.packing import PACK_OUTPUTS, PACK_REQUESTS, members
from batchrun.records import FailureType
from batchrun.task_kinds import task_kind
from batchrun.tasks.base import PreparedRequest, bad_body, error_object, load_json, require_prompt

if TYPE_CHECKING:
    from batchrun.records import Row
    from batchrun.spec import JobSpec

__all__ = [
    "CLASSIFICATION_OUTPUT_SCHEMA",
    "EMBEDDING_OUTPUT_SCHEMA",
    "RERANK_OUTPUT_SCHEMA",
    "ClassificationTask",
    "EmbeddingTask",
    "RerankTask",
]

def embedding_output_schema(dtype: str = "float32") -> pa.Schema:
    """An embedding per row: a list of ``dtype`` (float32, or float16 when the spec asks), of one length
    for the whole job."""
    return pa.schema([pa.field("embedding", pa.list_(pa.float16() if dtype == "float16" else pa.float32()))])


EMBEDDING_OUTPUT_SCHEMA = embedding_output_schema()
"""An embedding per row: a list of float32, of one length for the whole job."""

RERANK_OUTPUT_SCHEMA = pa.schema([
    pa.field("scores", pa.list_(pa.float32())),
    pa.field("ranks", pa.list_(pa.int32())),
])
"""Per row, aligned with its candidate texts: each one's score, and its rank (0: the best)."""

CLASSIFICATION_OUTPUT_SCHEMA = pa.schema([
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.float32())),
])
"""Per row: the best label and its score, then every label and score, best first."""

#: The OpenAI-style embeddings route; a job whose endpoint url ends with it speaks OpenAI's form.
OPENAI_EMBEDDINGS = "/v1/embeddings"


def _checked(doc: Any, status: int) -> Any:
    error = error_object(doc)
    if error is not None:
        raise bad_body(f"HTTP {status} carrying an error: {error}")
    return doc


class _PackedTextTask:
    """A task whose request carries a pack of rows' texts; ``parse`` answers one outcome per member."""

    kind = task_kind("feature-extraction")
    packs = True
    output_schema: pa.Schema

    def __init__(self, *, template: str | None, column: str | None, parameters: Mapping[str, Any]) -> None:
        self.template = template
        self.column = column
        self.parameters = dict(parameters)

    def text_of(self, row: Row) -> str:
        """The text ``row`` sends; a non-retryable RequestFailed when it has none."""
        return require_prompt(self.template, self.column, row)

    def member_input(self, row: Row) -> Any:
        """What one member adds to the request's ``inputs``."""
        return self.text_of(row)

    def inputs(self, row: Row) -> list[Any]:
        """The ``inputs`` of ``row``'s request: each member's (prepared once, by the dispatcher), or its own."""
        packed = members(row)
        if packed is None:
            return [self.member_input(row)]
        prepared = row.columns.get(PACK_REQUESTS)
        return list(prepared) if prepared else [self.member_input(member) for member in packed]

    def describe(self, request: PreparedRequest) -> str:
        """The texts the request sends, one per line."""
        texts = request.payload.get("inputs", request.payload.get("input", []))
        return "\n".join(str(text[0] if isinstance(text, list) and len(text) == 1 else text) for text in texts)


class EmbeddingTask(_PackedTextTask):
    """TEI's ``POST /embed`` (``{"inputs": [texts], ...}`` → a vector per text), or its OpenAI-style
    ``POST /v1/embeddings`` when the endpoint url names that route."""

    kind = task_kind("feature-extraction")
    name = kind.name
    output_schema = EMBEDDING_OUTPUT_SCHEMA

    def __init__(self, *, template: str | None, column: str | None, parameters: Mapping[str, Any],
                 openai: bool = False, dtype: str = "float32") -> None:
        super().__init__(template=template, column=column, parameters=parameters)
        self.openai = openai
        self._dtype = np.float16 if dtype == "float16" else np.float32
        if dtype != "float32":
            self.output_schema = embedding_output_schema(dtype)
        self.route = OPENAI_EMBEDDINGS if openai else self.kind.route
        self.dimension: int | None = None  # from the first answer, then held

    @classmethod
    def from_spec(cls, spec: JobSpec) -> EmbeddingTask:
        """The task a validated spec describes."""
        url = spec.endpoint.url or ""
        openai = urllib.parse.urlsplit(url).path.rstrip("/").endswith(OPENAI_EMBEDDINGS)
        return cls(template=spec.prompt.template, column=spec.prompt.column, parameters=spec.parameters,
                   openai=openai, dtype=spec.embedding_dtype)

    def hold_dimension(self, dimension: int) -> None:
        """Hold vectors to ``dimension`` values (an earlier run's), rather than the first answer's."""
        self.dimension = dimension

    def prepare(self, row: Row) -> PreparedRequest:
        """The request for ``row`` (a pack, or a single row)."""
        texts = self.inputs(row)
        key = "input" if self.openai else "inputs"
        return PreparedRequest(self.route, {**self.parameters, key: texts})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """One vector per text sent, in order; a retryable failure for an answer of another shape."""
        doc = _checked(load_json(body), status)
        if self.openai:
            data = doc.get("data") if isinstance(doc, dict) else None
            if not isinstance(data, list):
                raise bad_body("the answer has no data list")
            try:
                vectors = [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]
            except (KeyError, TypeError):
                raise bad_body("an item of data has no index or embedding") from None
        else:
            vectors = doc
        if not isinstance(vectors, list) or not all(isinstance(vector, list) for vector in vectors):
            raise bad_body("the answer is not a list of vectors")
        return {PACK_OUTPUTS: [self._vector(vector) for vector in self._block(vectors)]}

    def _block(self, vectors: list[list[Any]]) -> list[Any]:
        """The answer's vectors as rows of one NumPy array of the stored type: a quarter of the memory of
        Python floats while they wait in a shard, and converted to Arrow without touching each value.
        An answer that is not one rectangle of numbers stays as it came (each row is then checked alone)."""
        try:
            block = np.asarray(vectors, dtype=self._dtype)
        except (ValueError, TypeError):
            return vectors
        return list(block) if block.ndim == 2 else vectors

    def _vector(self, vector: Any) -> dict[str, Any] | RequestFailed:
        # Its values are not looked at one by one here (that costs more than the request): the sink
        # converts the column whole, and a row it cannot convert becomes a failure record.
        if self.dimension is None:
            self.dimension = len(vector)
        elif len(vector) != self.dimension:
            return RequestFailed(
                FailureType.EMBEDDING_DIMENSION,
                f"the embedding has {len(vector)} values where the job's first had {self.dimension}",
                retryable=False,
            )
        return {"embedding": vector}


class ClassificationTask(_PackedTextTask):
    """TEI's ``POST /predict``: ``{"inputs": [[text], ...]}`` (each a list of one: a list of two is a
    pair) → per text, every label with its score, best first."""

    kind = task_kind("text-classification")
    name = kind.name
    output_schema = CLASSIFICATION_OUTPUT_SCHEMA

    @classmethod
    def from_spec(cls, spec: JobSpec) -> ClassificationTask:
        """The task a validated spec describes."""
        return cls(template=spec.prompt.template, column=spec.prompt.column, parameters=spec.parameters)

    def member_input(self, row: Row) -> Any:
        return [self.text_of(row)]

    def prepare(self, row: Row) -> PreparedRequest:
        """The request for ``row`` (a pack, or a single row)."""
        return PreparedRequest(self.kind.route, {**self.parameters, "inputs": self.inputs(row)})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """One ranking of the labels per text sent."""
        doc = _checked(load_json(body), status)
        if not isinstance(doc, list) or not all(isinstance(item, list) and item for item in doc):
            raise bad_body("the answer is not a list of predictions per input")
        outputs: list[dict[str, Any] | RequestFailed] = []
        for predictions in doc:
            try:
                labels = [str(p["label"]) for p in predictions]
                scores = [float(p["score"]) for p in predictions]
            except (KeyError, TypeError, ValueError):
                raise bad_body("a prediction has no label or score") from None
            outputs.append({"label": labels[0], "score": scores[0], "labels": labels, "scores": scores})
        return {PACK_OUTPUTS: outputs}


class RerankTask:
    """TEI's ``POST /rerank``: a row's query (``prompt``) and candidate texts (``prompt.texts_column``)
    in one request; the scores come back aligned with the candidates, with each one's rank."""

    kind = task_kind("rerank")
    name = kind.name
    output_schema = RERANK_OUTPUT_SCHEMA

    def __init__(self, *, template: str | None, column: str | None, texts_column: str,
                 parameters: Mapping[str, Any]) -> None:
        self.template = template
        self.column = column
        self.texts_column = texts_column
        self.parameters = dict(parameters)

    @classmethod
    def from_spec(cls, spec: JobSpec) -> RerankTask:
        """The task a validated spec describes."""
        assert spec.prompt.texts_column is not None  # required by the spec parser for rerank
        return cls(template=spec.prompt.template, column=spec.prompt.column, texts_column=spec.prompt.texts_column,
                   parameters=spec.parameters)

    def prepare(self, row: Row) -> PreparedRequest:
        """The request for ``row``: its query and its candidates."""
        query = require_prompt(self.template, self.column, row)
        texts = row.columns.get(self.texts_column)
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise RequestFailed(FailureType.BAD_TEXTS, f"column {self.texts_column!r} must hold a non-empty list of "
                                "texts in this row", retryable=False)
        return PreparedRequest(self.kind.route, {**self.parameters, "query": query, "texts": list(texts)})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Scores and ranks aligned with the candidates (the answer comes best first)."""
        doc = _checked(load_json(body), status)
        if not isinstance(doc, list):
            raise bad_body("the answer is not a list of ranks")
        try:
            ranked = [(int(item["index"]), float(item["score"])) for item in doc]
        except (KeyError, TypeError, ValueError):
            raise bad_body("a rank has no index or score") from None
        count = len(ranked)
        scores: list[float | None] = [None] * count
        ranks: list[int | None] = [None] * count
        for rank, (index, score) in enumerate(ranked):
            if not 0 <= index < count or scores[index] is not None:
                raise bad_body(f"the ranks' indexes are not each candidate once (index {index})")
            scores[index], ranks[index] = score, rank
        return {"scores": scores, "ranks": ranks}

    def describe(self, request: PreparedRequest) -> str:
        """The query and its candidates."""
        return f"{request.payload.get('query')} | " + " | ".join(map(str, request.payload.get("texts", [])))
