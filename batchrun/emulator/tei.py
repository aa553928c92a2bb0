"""The Text Embeddings Inference (TEI) server of an emulated endpoint: embeddings, reranking, classification.

Follows TEI's own router, read at the 1.9.3 tag and compared with 1.8.3 (router/src/http/server.rs and
types.rs, router/src/lib.rs, core/src/tokenization.rs and infer.rs). ``tei_version`` picks what changed
in 1.9.0: a ``Validation`` error is a 413 before it and a 422 from it (#818); a batch's inputs wait for a
free permit before it and are refused with a 429 from it (#726); ``--auto-truncate`` defaults to false
before it and to true from it (#829); ``served_model_name`` is in ``/info`` from it (#685); and
``truncation_direction`` also takes lowercase from it (#755).

The model is a hash: an input's tokens (the emulator's word-and-mark tokenizer, plus BERT's two special
tokens in the counts) seed a numpy generator whose normal draws are the embedding, so the same text
(and prompt) always gives the same vector; ``expected_embedding`` computes it without a server.
Rerank scores grow with the words a text shares with the query; classifier logits are drawn from a hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from batchrun.emulator import textgen
from batchrun.emulator.config import EndpointConfig, tei_auto_truncate, tei_version_tuple
from batchrun.emulator.replies import Reply, text_reply

# TEI's ErrorType -> HTTP status (router/src/http/server.rs); Validation was 413 before 1.9.0.
_STATUS = {"Unhealthy": 503, "Backend": 424, "Overloaded": 429, "Tokenizer": 422, "Validation": 422, "Empty": 400}
MODEL_TYPES = {"feature-extraction": "embedding", "sentence-similarity": "embedding", "text-ranking": "reranker",
               "text-classification": "classifier"}
_DEFAULT_LABELS = {"classifier": ("NEGATIVE", "POSITIVE"), "reranker": ("LABEL_0",)}
MAX_CHAR_MULTIPLIER = 250  # core/src/tokenization.rs: inputs over max_input_length * 250 characters are cut or refused
_SPECIAL = {"single": 2, "pair": 3}  # [CLS] a [SEP] / [CLS] a [SEP] b [SEP]
_CLS, _SEP = (101, "[CLS]"), (102, "[SEP]")
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_DESERIALIZE = "Failed to deserialize the JSON body into the target type: "


@dataclass(frozen=True)
class Behaviour:
    """What a TEI version does where versions differ."""

    validation_status: int  # 413 before 1.9.0, 422 from it
    batch_inputs_wait: bool  # before 1.9.0 a batch's inputs wait for permits; from it they are refused (429)
    served_model_name: bool  # /info carries served_model_name from 1.9.0
    lowercase_direction: bool  # truncation_direction "left"/"right" accepted from 1.9.0

    @classmethod
    def of(cls, version: str) -> Behaviour:
        """The behaviour of TEI ``version`` (``"1.9.3"``)."""
        new = tei_version_tuple(version) >= (1, 9, 0)
        return cls(validation_status=422 if new else 413, batch_inputs_wait=not new, served_model_name=new,
                   lowercase_direction=new)


class TeiError(Exception):
    """A TEI ``ErrorResponse``: its ``error_type`` (``Validation``, ``Overloaded``, ...) and message."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def _validation(message: str) -> TeiError:
    return TeiError("Validation", f"Input validation error: {message}")


class Unparsable(Exception):
    """A body axum refuses before TEI sees it (plain text 400/422); carries the reply."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


# ----- the model

def _seed(material: object) -> int:
    data = json.dumps(material, separators=(",", ":"), ensure_ascii=False).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _raw_vector(tokens: list[str], dim: int, seed: int) -> np.ndarray:
    # Normal draws from a generator seeded by the tokens: a smaller dim is a prefix of a larger one
    # (numpy draws them in order), as Matryoshka models' `dimensions` cut a full vector.
    material: list[Any] = [tokens] if seed == 0 else [tokens, seed]
    return np.random.default_rng(_seed(material)).standard_normal(dim).astype(np.float32)


def _finish(vector: np.ndarray, normalize: bool) -> np.ndarray:
    if normalize:
        # As TEI does: the scale in f64, the product in f32 (core/src/infer.rs).
        scale = np.float32(1.0 / math.sqrt(float(np.dot(vector.astype(np.float64), vector.astype(np.float64)))))
        vector = vector * scale
    return vector


def _wire(value: object) -> Any:
    """What a JSON client reads back: f32 values written at f32 precision, as TEI (serde) writes them."""
    return orjson.loads(orjson.dumps(value, option=_JSON_OPTIONS))


def expected_embedding(text: str, dim: int, normalize: bool = True, *, prompt: str = "", seed: int = 0,
                       dimensions: int | None = None) -> list[float]:
    """The vector an emulated TEI endpoint answers for ``text``, as a JSON client reads it.

    ``dim`` is the endpoint's ``embedding_dim``, ``prompt`` the text of the ``prompt_name`` sent (the
    endpoint's ``prompts``), ``seed`` the endpoint's ``seed``, ``dimensions`` the request's. For an input
    the endpoint truncated, pass the kept tokens joined by spaces.
    """
    vector = _raw_vector(textgen.tokens(prompt + text), dim, seed)
    if dimensions is not None:
        vector = vector[:dimensions]
    return _wire(_finish(vector, normalize))


def _unit(material: object) -> float:
    """A reproducible number in [-1, 1) from ``material``."""
    return random.Random(_seed(material)).uniform(-1.0, 1.0)


def _words(tokens: list[str]) -> set[str]:
    return {token.lower() for token in tokens if token[0].isalnum() or token[0] == "_"}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


# ----- requests

@dataclass
class Encoded:
    """One input after tokenization: its tokens (a pair's second part apart) and its length with special tokens."""

    tokens: list[str]
    second: list[str] | None
    length: int


@dataclass
class Job:
    """A parsed TEI request: which route, its inputs and options; ``batch`` when the body held a list."""

    kind: str  # embed, openai, similarity, rerank, predict, tokenize
    payload: dict
    inputs: list[Any]  # str, or (str, str) for pairs
    batch: bool
    texts: list[str] = field(default_factory=list)  # every text of every input, for x-compute-characters

    @property
    def refused_in_flight(self) -> bool:
        """predict and rerank take their permits inside the per-input futures: the ones admitted run
        before the 429 is answered (server.rs); the embed routes take them all first."""
        return self.kind in ("predict", "rerank")


@dataclass
class Outcome:
    """The answer to a job (or the error) and the token count of each input, for latency and headers."""

    reply: Reply
    lengths: list[int]
    characters: int = 0


class TeiModel:
    """Answers the TEI routes for one endpoint's configuration."""

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self.behaviour = Behaviour.of(config.tei_version)
        self.model_type = MODEL_TYPES.get(config.task, "embedding")
        self.labels = config.id2label or _DEFAULT_LABELS.get(self.model_type, ())
        self.auto_truncate = tei_auto_truncate(config)
        # With auto-truncate, TEI lowers a max_input_length over max_batch_tokens to it (router/src/lib.rs).
        self.max_input_length = min(config.max_input_length, config.max_batch_tokens)
        self.prompts = dict(config.prompts)

    # ----- replies

    def error(self, error: TeiError, *, openai: bool = False) -> Reply:
        """TEI's error body, ``{"error", "error_type"}``; on the OpenAI routes ``{"message", "code", "type"}``."""
        status = _STATUS[error.error_type]
        if error.error_type == "Validation":
            status = self.behaviour.validation_status
        if openai:
            body: dict[str, Any] = {"message": error.message, "code": status, "type": error.error_type}
        else:
            body = {"error": error.message, "error_type": error.error_type}
        return Reply(status, orjson.dumps(body), "application/json")

    @staticmethod
    def ok(payload: object, headers: dict[str, str] | None = None) -> Reply:
        """A 200 carrying f32 numbers at f32 precision."""
        return Reply(200, orjson.dumps(payload, option=_JSON_OPTIONS), "application/json", headers or {})

    def info(self) -> dict:
        """The body of GET /info, in TEI's field order."""
        cfg = self.config
        labels = {str(i): label for i, label in enumerate(self.labels)}
        model_type: dict[str, Any]
        if self.model_type == "embedding":
            model_type = {"embedding": {"pooling": cfg.pooling}}
        else:
            model_type = {self.model_type: {"id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}}
        info: dict[str, Any] = {"model_id": cfg.model_id, "model_sha": cfg.model_sha, "model_dtype": "float16"}
        if self.behaviour.served_model_name:
            info["served_model_name"] = cfg.model_id
        info.update({
            "model_type": model_type, "max_concurrent_requests": cfg.max_concurrent_requests,
            "max_input_length": self.max_input_length, "max_batch_tokens": cfg.max_batch_tokens,
            "max_batch_requests": cfg.max_batch_requests, "max_client_batch_size": cfg.max_client_batch_size,
            "auto_truncate": self.auto_truncate, "tokenization_workers": cfg.tokenization_workers,
            "version": cfg.tei_version, "sha": _build_sha(cfg.tei_version), "docker_label": None,
        })
        return info

    def root_kind(self) -> str:
        """What ``POST /`` (and ``/invocations``) serves: predict, rerank, similarity or embed (server.rs)."""
        if self.model_type == "classifier":
            return "predict"
        if self.model_type == "reranker":
            return "rerank"
        return "similarity" if self.config.task == "sentence-similarity" else "embed"

    # ----- stage 1: what TEI checks before it takes permits

    def prepare(self, kind: str, body: bytes) -> Job:
        """Parse a body and run the checks TEI makes before taking permits; TeiError or Unparsable if refused."""
        payload = _parse(body)
        inputs: list[Any]
        self._options(kind, payload)  # serde refuses a mistyped option before any check of TEI's own
        if kind == "tokenize" and payload.get("inputs") == []:
            raise TeiError("Empty", "`inputs` cannot be empty")  # TokenizeInput reads [] as an empty batch
        if kind in ("embed", "tokenize"):
            batch, inputs = _text_inputs(payload, "inputs")
        elif kind == "openai":
            batch, inputs = _text_inputs(payload, "input")
            _variant(payload, "encoding_format", ("float", "base64"))
        elif kind == "similarity":
            inner = _required(payload, "inputs")
            if not isinstance(inner, dict) or not isinstance(inner.get("source_sentence"), str) \
                    or not _string_list(inner.get("sentences")):
                raise Unparsable(text_reply(422, _DESERIALIZE + "inputs: expected struct SimilarityInput with "
                                                 "`source_sentence` (a string) and `sentences` (strings)"))
            if not inner["sentences"]:
                raise TeiError("Empty", "`inputs.sentences` cannot be empty")
            batch, inputs = True, [inner["source_sentence"], *inner["sentences"]]
        elif kind == "rerank":
            query, texts = _required(payload, "query"), _required(payload, "texts")
            if not isinstance(query, str) or not _string_list(texts):
                raise Unparsable(text_reply(422, _DESERIALIZE + "`query` must be a string and `texts` a list of "
                                                 "strings"))
            if not texts:
                raise TeiError("Empty", "`texts` cannot be empty")
            if self.model_type != "reranker":
                raise TeiError("Backend", "Backend error: model is not a re-ranker model")
            batch, inputs = True, [(query, text) for text in texts]
        elif kind == "predict":
            batch, inputs = _predict_inputs(payload)
        else:
            raise ValueError(f"unknown TEI route kind {kind!r}")
        if batch and kind != "rerank" and not inputs:
            raise TeiError("Empty", "`inputs` cannot be empty")
        if batch and len(inputs) > self.config.max_client_batch_size:
            raise TeiError("Validation", f"batch size {len(inputs)} > maximum allowed batch size "
                                         f"{self.config.max_client_batch_size}")
        # A pair counts both texts (rerank: the query once per text), as TEI's x-compute-characters does.
        texts = [text for item in inputs for text in (item if isinstance(item, tuple) else (item,))]
        return Job(kind, payload, inputs, batch, texts)

    def _options(self, kind: str, payload: dict) -> None:
        """Type-check the options, as serde does (a plain-text 422 on a wrong type)."""
        options = payload.get("parameters") if kind == "similarity" else payload
        if options is None:
            return
        if not isinstance(options, dict):
            raise Unparsable(text_reply(422, _DESERIALIZE + "parameters: invalid type: expected struct"))
        for name in ("truncate", "normalize", "raw_scores", "return_text", "add_special_tokens"):
            value = options.get(name)
            if value is not None and not isinstance(value, bool):
                raise Unparsable(text_reply(422, _DESERIALIZE + f"{name}: invalid type: {value!r}, expected a "
                                                 "boolean"))
        for name in ("prompt_name",):
            value = options.get(name)
            if value is not None and not isinstance(value, str):
                raise Unparsable(text_reply(422, _DESERIALIZE + f"{name}: invalid type, expected a string"))
        dimensions = options.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                       or dimensions < 0):
            raise Unparsable(text_reply(422, _DESERIALIZE + f"dimensions: invalid value: {dimensions!r}, expected "
                                             "usize"))
        accepted = ("Left", "Right", "left", "right") if self.behaviour.lowercase_direction else ("Left", "Right")
        _variant(options, "truncation_direction", accepted)

    # ----- stage 3: the model

    def run(self, job: Job) -> Outcome:
        """Answer a job whose permits were granted: per-input validation, then the model."""
        openai = job.kind == "openai"
        try:
            if job.kind in ("embed", "openai", "similarity"):
                return self._embed(job)
            if job.kind == "tokenize":
                return self._tokenize(job)
            return self._score(job)
        except TeiError as error:
            return Outcome(self.error(error, openai=openai), [])

    def _truncate(self, options: dict) -> bool:
        value = options.get("truncate")
        return self.auto_truncate if value is None else bool(value)

    def _embed(self, job: Job) -> Outcome:
        openai = job.kind == "openai"
        options = (job.payload.get("parameters") or {}) if job.kind == "similarity" else job.payload
        normalize = True if openai else (options.get("normalize", True) if job.kind == "embed" else False)
        dimensions = None if job.kind == "similarity" else options.get("dimensions")
        # openai: TEI's auto_truncate, right-hand side, no prompt (server.rs openai_embed).
        truncate = self.auto_truncate if openai else self._truncate(options)
        direction = "Right" if openai else str(options.get("truncation_direction") or "Right")
        prompt_name = None if openai else options.get("prompt_name")
        vectors, lengths = [], []
        for item in job.inputs:
            if dimensions == 0:
                raise _validation("`dimensions` should be positive")
            if self.model_type != "embedding":
                raise TeiError("Backend", "Backend error: Model is not an embedding model")
            encoded = self.encode(item, truncate=truncate, direction=direction, prompt_name=prompt_name)
            vector = _raw_vector(encoded.tokens, self.config.embedding_dim, self.config.seed)
            if dimensions is not None:
                if dimensions > vector.shape[0]:
                    raise _validation("`dimensions` should be smaller than the maximum embedding dimension.")
                vector = vector[:dimensions]
            vectors.append(_finish(vector, normalize))
            lengths.append(encoded.length)
        characters = sum(len(text) for text in job.texts)
        if job.kind == "similarity":
            source = vectors[0].astype(np.float64)
            scores = [np.float32(float(np.dot(source, v.astype(np.float64)))
                                 / (float(np.linalg.norm(source)) * float(np.linalg.norm(v.astype(np.float64)))
                                    or 1.0)) for v in vectors[1:]]
            return Outcome(self.ok(scores), lengths, characters)
        if not openai:
            return Outcome(self.ok(vectors), lengths, characters)
        base64_format = job.payload.get("encoding_format") == "base64"
        data = [{"object": "embedding",
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if base64_format else v,
                 "index": index} for index, v in enumerate(vectors)]
        tokens = sum(lengths)
        return Outcome(self.ok({"object": "list", "data": data, "model": self.config.model_id,
                                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}), lengths, characters)

    def _score(self, job: Job) -> Outcome:
        options = job.payload
        raw = bool(options.get("raw_scores"))
        truncate = self._truncate(options)
        direction = str(options.get("truncation_direction") or "Right")
        answers, lengths = [], []
        for item in job.inputs:
            if self.model_type == "embedding":
                raise TeiError("Backend", "Backend error: Model is not a classifier model")
            encoded = self.encode(item, truncate=truncate, direction=direction, prompt_name=None)
            logits = self._logits(encoded)
            scores = logits if raw else (_softmax(logits) if len(logits) > 1 else [_sigmoid(logits[0])])
            answers.append([np.float32(score) for score in scores])
            lengths.append(encoded.length)
        characters = sum(len(text) for text in job.texts)
        if job.kind == "rerank":
            ranks = []
            for index, answer in enumerate(answers):
                rank: dict[str, Any] = {"index": index}
                if options.get("return_text"):
                    rank["text"] = options["texts"][index]
                rank["score"] = answer[0]
                ranks.append(rank)
            return Outcome(self.ok(_descending(ranks)), lengths, characters)
        predictions = [_descending([{"score": score, "label": self.labels[i]} for i, score in enumerate(answer)])
                       for answer in answers]
        return Outcome(self.ok(predictions if job.batch else predictions[0]), lengths, characters)

    def _logits(self, encoded: Encoded) -> list[float]:
        seed = self.config.seed
        if self.model_type == "reranker" and encoded.second is not None:
            # Relevance: the share of the query's words the text holds, plus a little reproducible noise.
            query, text = _words(encoded.tokens), _words(encoded.second)
            overlap = len(query & text) / len(query) if query else 0.0
            return [8.0 * overlap - 4.0 + _unit(["rerank", encoded.tokens, encoded.second, seed])]
        return [4.0 * _unit(["label", encoded.tokens, encoded.second, i, seed]) for i in range(len(self.labels))]

    def _tokenize(self, job: Job) -> Outcome:
        add_special = job.payload.get("add_special_tokens", True)
        prompt_name = job.payload.get("prompt_name")
        answers = []
        for text in job.inputs:
            if text == "":
                raise TeiError("Empty", "Input validation error: `inputs` cannot be empty")
            prompted = self._prompt(prompt_name) + text
            tokens: list[dict[str, Any]] = [_special(_CLS)] if add_special else []
            for token, start, _stop in textgen.token_spans(prompted):
                byte_start = len(prompted[:start].encode())
                tokens.append({"id": _token_id(token), "text": token, "special": False, "start": byte_start,
                               "stop": byte_start + len(token.encode())})
            if add_special:
                tokens.append(_special(_SEP))
            answers.append(tokens)
        return Outcome(self.ok(answers), [])

    # ----- tokenization

    def _prompt(self, prompt_name: str | None) -> str:
        if prompt_name is None:
            return ""
        if not self.prompts:
            raise _validation(f"`default-prompt-name` is set to `{prompt_name}` but no prompts were found in the "
                              "Sentence Transformers configuration")
        if prompt_name not in self.prompts:
            names = ", ".join(f'"{name}"' for name in self.prompts)
            raise _validation(f"`default-prompt-name` is set to `{prompt_name}` but it was not found in the "
                              f"Sentence Transformers prompts. Available prompts: [{names}]")
        return self.prompts[prompt_name]

    def encode(self, item: str | tuple[str, str], *, truncate: bool, direction: str,
               prompt_name: str | None) -> Encoded:
        """Tokenize one input as TEI's tokenization workers do: empty, prompt, character and token checks."""
        pair = isinstance(item, tuple)
        first, second = item if isinstance(item, tuple) else (item, None)
        if (first == "" and second == "") if pair else first == "":
            raise TeiError("Empty", "Input validation error: `inputs` cannot be empty")
        prompt = self._prompt(prompt_name)
        if pair and prompt_name is not None:
            raise _validation("`prompt_name` cannot be set with dual inputs")
        limit = self.max_input_length * MAX_CHAR_MULTIPLIER
        characters = len(first) + len(second or "")
        if characters > limit:
            if not truncate:
                raise _validation(f"`inputs` must have less than {limit} characters. Given: {characters}")
            first = first[: limit // 2] if pair else first[:limit]
            second = second[: limit // 2] if second is not None else None
        tokens = textgen.tokens(prompt + first)
        second_tokens = textgen.tokens(second) if second is not None else None
        special = _SPECIAL["pair" if pair else "single"]
        length = len(tokens) + len(second_tokens or []) + special
        if length > self.max_input_length:
            if not truncate:
                raise _validation(f"`inputs` must have less than {self.max_input_length} tokens. Given: {length}")
            tokens, second_tokens = _cut(tokens, second_tokens, self.max_input_length - special,
                                         left=direction.lower() == "left")
            length = self.max_input_length
        return Encoded(tokens, second_tokens, length)

    # ----- timing

    def forward_passes(self, lengths: list[int]) -> list[int]:
        """The tokens of each forward pass that serves these inputs: packed in order into passes of at most
        max_batch_tokens tokens and max_batch_requests inputs (TEI's queue, core/src/queue.rs)."""
        passes: list[int] = []
        tokens = count = 0
        cap = self.config.max_batch_requests
        for length in lengths:
            if count and (tokens + length > self.config.max_batch_tokens or (cap is not None and count >= cap)):
                passes.append(tokens)
                tokens = count = 0
            tokens += length
            count += 1
        if count:
            passes.append(tokens)
        return passes

    def latency(self, lengths: list[int], body: bytes) -> float:
        """Seconds to serve inputs of these token lengths: per pass latency_base_s + latency_per_token_s per
        token, plus one reproducible jitter."""
        cfg = self.config
        seconds = sum(cfg.latency_base_s + cfg.latency_per_token_s * tokens for tokens in self.forward_passes(lengths))
        if cfg.latency_jitter_s:
            seconds += random.Random(_seed(["jitter", hashlib.blake2b(body).hexdigest()])).uniform(
                0, cfg.latency_jitter_s)
        return seconds

    @staticmethod
    def headers(outcome: Outcome, seconds: float) -> dict[str, str]:
        """TEI's x-* response headers (router/src/lib.rs ResponseMetadata), times in milliseconds."""
        total_ms = str(int(seconds * 1000))
        return {"x-compute-type": "gpu+optimized", "x-compute-time": total_ms,
                "x-compute-characters": str(outcome.characters), "x-compute-tokens": str(sum(outcome.lengths)),
                "x-total-time": total_ms, "x-tokenization-time": "0", "x-queue-time": "0",
                "x-inference-time": total_ms}


def overloaded(model: TeiModel, kind: str) -> Reply:
    """TEI's 429 past max_concurrent_requests."""
    return model.error(TeiError("Overloaded", "Model is overloaded"), openai=kind == "openai")


def fault_reply(model: TeiModel, fault: str, path: str) -> Reply | None:
    """The TEI answer of an injected 429 or model failure (a 424 ``Backend``); None for other faults."""
    openai = path in ("/v1/embeddings", "/embeddings")
    if fault in ("429", "429_no_retry_after"):
        return model.error(TeiError("Overloaded", "Model is overloaded"), openai=openai)
    if fault == "500":
        return model.error(TeiError("Backend", "Backend error: CUDA error: out of memory"), openai=openai)
    return None


ERROR_BODY = b'{"error":"Backend error: CUDA error: out of memory","error_type":"Backend"}'


def texts_of(body: bytes) -> list[str]:
    """Every text a TEI request body holds (inputs, input, query and texts, a similarity's sentences), for
    the stats, whether or not the request is valid."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(payload, dict):
        return []
    values: list[Any] = []
    for name in ("inputs", "input", "query", "texts"):
        value = payload.get(name)
        if isinstance(value, dict):
            value = [value.get("source_sentence"), *(value.get("sentences") or [])]
        values.extend(value if isinstance(value, list) else [value])
    flat = [text for value in values for text in (value if isinstance(value, list) else [value])]
    return [text for text in flat if isinstance(text, str)]


# ----- parsing helpers

def _parse(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise Unparsable(text_reply(400, f"Failed to parse the request body as JSON: {error}")) from None
    if not isinstance(payload, dict):
        raise Unparsable(text_reply(422, _DESERIALIZE + "invalid type: expected struct"))
    return payload


def _required(payload: dict, name: str) -> Any:
    if name not in payload:
        raise Unparsable(text_reply(422, _DESERIALIZE + f"missing field `{name}`"))
    return payload[name]


def _string_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _text_inputs(payload: dict, name: str) -> tuple[bool, list[str]]:
    """TEI's ``Input``: a string (one input) or a list of strings (a batch). Token ids are not emulated."""
    value = _required(payload, name)
    if isinstance(value, str):
        return False, [value]
    if value == []:
        # serde reads [] as one input of zero token ids, which tokenization refuses as empty.
        raise TeiError("Empty", "Input validation error: `inputs` cannot be empty")
    if _string_list(value):
        return True, list(value)
    raise Unparsable(text_reply(422, _DESERIALIZE + f"{name}: data did not match any variant of untagged enum "
                                     "Input (token ids are not emulated)"))


def _predict_inputs(payload: dict) -> tuple[bool, list[Any]]:
    """TEI's ``PredictInput``: a string, a pair ``[a, b]``, or a batch of ``[a]`` / ``[a, b]`` lists."""
    value = _required(payload, "inputs")
    expected = ("invalid length, expected a string, a pair of strings [string, string] or a batch of mixed "
                "strings and pairs [[string], [string, string], ...]")
    if isinstance(value, str):
        return False, [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        if len(value) > 2:
            raise Unparsable(text_reply(422, _DESERIALIZE + f"inputs: {expected}"))
        return False, [value[0] if len(value) == 1 else (value[0], value[1])]
    if isinstance(value, list) and value and all(_string_list(item) and 1 <= len(item) <= 2 for item in value):
        return True, [item[0] if len(item) == 1 else (item[0], item[1]) for item in value]
    raise Unparsable(text_reply(422, _DESERIALIZE + f"inputs: {expected}"))


def _variant(options: dict, name: str, accepted: tuple[str, ...]) -> None:
    value = options.get(name)
    if value is not None and value not in accepted:
        raise Unparsable(text_reply(422, _DESERIALIZE + f"{name}: unknown variant `{value}`, expected one of "
                                         + ", ".join(f"`{a}`" for a in accepted)))


def _cut(tokens: list[str], second: list[str] | None, keep: int, *, left: bool) -> tuple[list[str], list[str] | None]:
    """Truncate to ``keep`` tokens: one input from the chosen side; a pair longest-first, as tokenizers does."""
    def side(part: list[str], n: int) -> list[str]:
        return part[len(part) - n:] if left else part[:n]
    if second is None:
        return side(tokens, keep), None
    a, b = len(tokens), len(second)
    while a + b > keep:
        if a >= b:
            a -= 1
        else:
            b -= 1
    return side(tokens, a), side(second, b)


def _descending(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Rust's stable sort ascending, then reverse (server.rs): equal scores come out in reverse order.
    return sorted(items, key=lambda item: float(item["score"]))[::-1]


def _special(token: tuple[int, str]) -> dict[str, Any]:
    return {"id": token[0], "text": token[1], "special": True, "start": None, "stop": None}


def _token_id(token: str) -> int:
    # A stable id inside BERT's 30,522-token vocabulary, clear of its special ids.
    return 1000 + int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "big") % 29522


def _build_sha(version: str) -> str:
    # The git sha of the TEI build, as /info reports it: a fixed stand-in per version.
    return hashlib.sha1(f"text-embeddings-inference/{version}".encode()).hexdigest()
