"""The TGI model server of an emulated endpoint: /generate, /, /generate_stream, /v1/chat/completions,
/v1/completions.

Validation follows TGI's router: a 422 ``validation`` error for empty inputs, too many tokens,
bad parameters and bad images; axum's plain-text 400/422 for a body that is not JSON or lacks a
required field. Vision models (task ``image-text-to-text``) decode their images and begin their
answer with a sentence naming each image's size and dominant colour.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image

from batchrun.emulator import schema_docs, textgen, vision
from batchrun.emulator.config import EndpointConfig
from batchrun.emulator.replies import Reply, json_reply, text_reply, tgi_error

TGI_VERSION = "3.3.6"
# The git sha of the TGI build, as /info reports it (a fixed stand-in: the emulator is no TGI build).
TGI_SHA = hashlib.sha1(f"text-generation-inference/{TGI_VERSION}".encode()).hexdigest()
IMAGE_TOKENS = 64  # prompt tokens counted per image (assumed; real models use hundreds to thousands)
MAX_STOP_SEQUENCES = 4
# Parameters that change the sampled words; max_new_tokens and stop only cut the stream.
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "do_sample", "repetition_penalty", "frequency_penalty",
                  "typical_p", "watermark", "grammar", "adapter_id")
_CHAT_FINISH = {"eos_token": "stop", "length": "length", "stop_sequence": "stop_sequence"}

ImageLoader = Callable[[str], Awaitable[Image.Image]]


class Invalid(Exception):
    """A request TGI refuses; carries the reply to send."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


def _validation(message: str) -> Invalid:
    return Invalid(tgi_error(422, "validation", f"Input validation error: {message}"))


@dataclass
class Prepared:
    """A validated request: what the generator needs and what the answer reports."""

    prompt: str  # the text the stream is seeded with, also the stats key
    prefix_tokens: list[str]  # answer tokens that come before the generated ones (image descriptions)
    input_tokens: int
    max_new_tokens: int
    stop: list[str]
    seed: int | None
    sampling: dict
    schema: dict | bool | None = None  # the JSON Schema of a ``json`` grammar: the answer is a document
    broken: bool = False  # the ``invalid_json`` fault: the answer breaks the schema


class TgiModel:
    """Answers the TGI routes for one endpoint's configuration."""

    def __init__(self, config: EndpointConfig, load_image: ImageLoader) -> None:
        self.config = config
        self.is_vision = config.task == "image-text-to-text"
        self._load_image = load_image
        self._compute_type = f"{config.instance_size.lstrip('x') or '1'}-{config.instance_type}"

    # ----- request parsing

    @staticmethod
    def parse_body(body: bytes, required: str) -> dict:
        """Parse JSON as axum does: 400 for bad JSON, 422 for a missing or mistyped field."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise Invalid(text_reply(400, f"Failed to parse the request body as JSON: {error}")) from None
        if not isinstance(payload, dict):
            raise Invalid(text_reply(422, "Failed to deserialize the JSON body into the target type: "
                                          "invalid type: expected struct"))
        if required not in payload:
            raise Invalid(text_reply(422, "Failed to deserialize the JSON body into the target type: "
                                          f"missing field `{required}` at line 1 column {len(body)}"))
        return payload

    async def prepare_generate(self, payload: dict) -> Prepared:
        """Validate a /generate body."""
        inputs = payload["inputs"]
        if not isinstance(inputs, str):
            raise Invalid(text_reply(422, "Failed to deserialize the JSON body into the target type: "
                                          "inputs: invalid type: expected a string"))
        parameters = payload.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise Invalid(text_reply(422, "Failed to deserialize the JSON body into the target type: "
                                          "parameters: invalid type: expected struct GenerateParameters"))
        if not inputs:
            raise _validation("`inputs` cannot be empty")
        prefix: list[str] = []
        image_count = 0
        text = inputs
        if self.is_vision:
            urls = vision.MARKDOWN_IMAGE.findall(inputs)
            images = [await self._image(url) for url in urls]
            image_count = len(images)
            if images:
                prefix = _split_words(vision.describe(images))
                text = vision.MARKDOWN_IMAGE.sub("", inputs)
        input_tokens = textgen.count_tokens(text) + IMAGE_TOKENS * image_count
        prepared = self._limits(inputs, prefix, input_tokens, parameters.get("max_new_tokens"), parameters)
        prepared.schema = _grammar_schema(parameters.get("grammar"), "parameters.grammar")
        return prepared

    async def prepare_chat(self, payload: dict) -> Prepared:
        """Validate a /v1/chat/completions body."""
        messages = payload["messages"]
        if not isinstance(messages, list) or not messages:
            raise _validation("`messages` cannot be empty")
        lines: list[str] = []
        images: list[Image.Image] = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise Invalid(text_reply(422, "Failed to deserialize the JSON body into the target type: "
                                              f"messages[{index}]: missing field `role`"))
            content = message.get("content")
            if isinstance(content, str) or content is None:
                lines.append(f"{message['role']}: {content or ''}")
                continue
            if not isinstance(content, list):
                raise Invalid(text_reply(422, "Failed to deserialize the JSON body into the target type: "
                                              f"messages[{index}].content: invalid type"))
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    if not self.is_vision:
                        raise _validation("this model does not support image inputs")
                    url = (part.get("image_url") or {}).get("url", "")
                    images.append(await self._image(url))
                else:
                    raise Invalid(text_reply(422, "Failed to deserialize the JSON body into the target type: "
                                                  f"messages[{index}].content: unknown part type {kind!r}"))
            lines.append(f"{message['role']}: {' '.join(texts)}")
        prompt = chat_prompt(messages)
        if not prompt.replace(":", "").strip() and not images:
            raise _validation("`inputs` cannot be empty")
        prefix = _split_words(vision.describe(images)) if images else []
        input_tokens = textgen.count_tokens(prompt) + IMAGE_TOKENS * len(images)
        parameters = {key: payload.get(key) for key in ("temperature", "top_p", "seed", "stop", "frequency_penalty")}
        parameters["grammar"] = payload.get("response_format")  # it shapes the answer, so it seeds it too
        prepared = self._limits(prompt, prefix, input_tokens, payload.get("max_tokens"), parameters)
        prepared.schema = _grammar_schema(payload.get("response_format"), "response_format")
        return prepared

    async def prepare_completions(self, payload: dict) -> Prepared:
        """Validate a /v1/completions body (OpenAI's legacy completions: one prompt, text out)."""
        prompt = payload["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _validation("`prompt` must be a string (or a list of one string) on this emulator")
        if not prompt:
            raise _validation("`prompt` cannot be empty")
        if payload.get("stream"):
            raise _validation("streaming is not emulated on /v1/completions")
        input_tokens = textgen.count_tokens(prompt)
        parameters = {key: payload.get(key) for key in ("temperature", "top_p", "seed", "stop", "frequency_penalty")}
        return self._limits(prompt, [], input_tokens, payload.get("max_tokens"), parameters)

    async def _image(self, url: str) -> Image.Image:
        try:
            return await self._load_image(url)
        except vision.ImageRejected as error:
            raise _validation(str(error)) from None

    def _limits(self, prompt: str, prefix: list[str], input_tokens: int, max_new_tokens: object,
                parameters: dict) -> Prepared:
        cfg = self.config
        if input_tokens > cfg.max_input_tokens:
            raise _validation(f"`inputs` must have less than {cfg.max_input_tokens} tokens. Given: {input_tokens}")
        if max_new_tokens is None:
            max_new = cfg.max_total_tokens - input_tokens
        elif not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
            raise Invalid(text_reply(422, "Failed to deserialize the JSON body into the target type: "
                                          "max_new_tokens: invalid type: expected u32"))
        elif max_new_tokens <= 0:
            raise _validation("`max_new_tokens` must be strictly positive")
        else:
            max_new = max_new_tokens
        if input_tokens + max_new > cfg.max_total_tokens:
            raise _validation(f"`inputs` tokens + `max_new_tokens` must be <= {cfg.max_total_tokens}. "
                              f"Given: {input_tokens} `inputs` tokens and {max_new} `max_new_tokens`")
        temperature = parameters.get("temperature")
        if temperature is not None and temperature <= 0:
            raise _validation("`temperature` must be strictly positive")
        top_p = parameters.get("top_p")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise _validation("`top_p` must be > 0.0 and < 1.0")
        stop = parameters.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if len(stop) > MAX_STOP_SEQUENCES:
            raise _validation(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(stop)}")
        seed = parameters.get("seed")
        sampling = {key: parameters[key] for key in _SAMPLING_KEYS if parameters.get(key) is not None}
        return Prepared(prompt, prefix, input_tokens, max_new, list(stop), seed, sampling)

    # ----- generation

    def run(self, prepared: Prepared) -> textgen.Generation:
        """Generate deterministically: the image description first, then the seeded word stream."""
        # The endpoint's own seed plays the part of its weights: two endpoints answer differently.
        sampling = {**prepared.sampling, "endpoint_seed": self.config.seed} if self.config.seed else prepared.sampling
        seed = textgen.stream_seed(prepared.prompt, prepared.seed, sampling)
        if prepared.schema is not None:
            # A json grammar: the answer is a document valid against the schema (or, under the
            # invalid_json fault, one that is not), cut by max_new_tokens like any generation.
            rng = random.Random(seed)
            draw = schema_docs.violation if prepared.broken else schema_docs.document
            text = draw(prepared.schema, rng)
            text = text if isinstance(text, str) and prepared.broken else json.dumps(text)
            return textgen.generate(iter(_JSON_TOKEN.findall(text)), max_new_tokens=prepared.max_new_tokens,
                                    stop=prepared.stop)
        words = textgen.word_stream(seed)
        if prepared.prefix_tokens:
            words = _chain(prepared.prefix_tokens, (" " + w.lstrip() if w != "." else w for w in words))
        return textgen.generate(words, max_new_tokens=prepared.max_new_tokens, stop=prepared.stop)

    def latency(self, prepared: Prepared, generated: int) -> tuple[float, float]:
        """(time to first token, time per token) for this request, jitter included and reproducible."""
        cfg = self.config
        jitter = 0.0
        if cfg.latency_jitter_s:
            rng = random.Random(textgen.stream_seed(prepared.prompt, prepared.seed, {"jitter": True}))
            jitter = rng.uniform(0, cfg.latency_jitter_s)
        return cfg.latency_base_s + jitter, cfg.latency_per_token_s

    def headers(self, prepared: Prepared, generation: textgen.Generation, seconds: float) -> dict[str, str]:
        """TGI's x-* response headers."""
        generated = len(generation.tokens)
        total_ms = int(seconds * 1000)
        return {
            "x-compute-type": self._compute_type,
            "x-compute-time": f"{seconds:.6f}",
            "x-compute-characters": str(len(prepared.prompt)),
            "x-prompt-tokens": str(prepared.input_tokens),
            "x-generated-tokens": str(generated),
            "x-total-time": str(total_ms),
            "x-validation-time": "0",
            "x-queue-time": "0",
            "x-inference-time": str(total_ms),
            "x-time-per-token": str(total_ms // generated if generated else 0),
        }

    # ----- answers

    async def generate(self, payload: dict, prepared: Prepared, *, as_list: bool) -> Reply:
        """The answer of /generate (``as_list``: of /, a one-element list)."""
        started = time.perf_counter()
        generation = self.run(prepared)
        first, per_token = self.latency(prepared, len(generation.tokens))
        await _pause(first + per_token * len(generation.tokens))
        parameters = payload.get("parameters") or {}
        text = generation.text
        if parameters.get("return_full_text"):
            text = payload["inputs"] + text
        answer: dict = {"generated_text": text}
        if parameters.get("details"):
            answer["details"] = {
                "finish_reason": generation.finish_reason,
                "generated_tokens": len(generation.tokens),
                "seed": prepared.seed,
                "prefill": [],
                "tokens": [_token_object(t) for t in generation.tokens],
                "top_tokens": None,
            }
        headers = self.headers(prepared, generation, time.perf_counter() - started)
        return json_reply([answer] if as_list else answer, headers=headers)

    async def chat(self, payload: dict, prepared: Prepared) -> Reply:
        """The answer of /v1/chat/completions."""
        return await self._openai_reply(payload, prepared, "chat.completion", lambda generation: {
            "message": {"role": "assistant", "content": generation.text}})

    async def completions(self, payload: dict, prepared: Prepared) -> Reply:
        """The answer of /v1/completions, in OpenAI's ``text_completion`` shape as TGI gives it."""
        return await self._openai_reply(payload, prepared, "text_completion", lambda generation: {
            "text": generation.text})

    async def _openai_reply(self, payload: dict, prepared: Prepared, kind: str,
                            content: Callable[[Any], dict[str, Any]]) -> Reply:
        """An OpenAI-shaped answer as TGI gives it (one choice, usage), after the generation's latency;
        ``content`` gives the choice's own part (a chat ``message``, a completion's ``text``)."""
        started = time.perf_counter()
        generation = self.run(prepared)
        first, per_token = self.latency(prepared, len(generation.tokens))
        await _pause(first + per_token * len(generation.tokens))
        choice = {"index": 0, **content(generation), "logprobs": None,
                  "finish_reason": _CHAT_FINISH[generation.finish_reason]}
        answer = {
            "object": kind,
            "id": "",
            "created": int(time.time()),
            "model": payload.get("model", "tgi"),
            "system_fingerprint": f"{TGI_VERSION}-native",
            "choices": [choice],
            "usage": {"prompt_tokens": prepared.input_tokens, "completion_tokens": len(generation.tokens),
                      "total_tokens": prepared.input_tokens + len(generation.tokens)},
        }
        return json_reply(answer, headers=self.headers(prepared, generation, time.perf_counter() - started))

    async def stream_generate(self, request: web.Request, payload: dict, prepared: Prepared) -> web.StreamResponse:
        """Server-sent events of /generate_stream (no [DONE] line)."""
        generation = self.run(prepared)
        first, per_token = self.latency(prepared, len(generation.tokens))
        response = await _open_sse(request)
        await _pause(first)
        text = ""
        for index, token in enumerate(generation.tokens, start=1):
            await _pause(per_token)
            text += token
            last = index == len(generation.tokens)
            event = {"index": index, "token": _token_object(token), "generated_text": None, "details": None,
                     "top_tokens": None}
            if last:
                full = (payload["inputs"] + text) if (payload.get("parameters") or {}).get("return_full_text") else text
                event["generated_text"] = full
                event["details"] = {"finish_reason": generation.finish_reason, "generated_tokens": index,
                                    "seed": prepared.seed, "input_length": prepared.input_tokens}
            await response.write(b"data:" + json.dumps(event).encode() + b"\n\n")
        await response.write_eof()
        return response

    async def stream_chat(self, request: web.Request, payload: dict, prepared: Prepared) -> web.StreamResponse:
        """Server-sent events of a streamed chat completion, ending with ``data: [DONE]``."""
        generation = self.run(prepared)
        first, per_token = self.latency(prepared, len(generation.tokens))
        response = await _open_sse(request)
        await _pause(first)
        created = int(time.time())
        model = payload.get("model", "tgi")
        for index, token in enumerate(generation.tokens, start=1):
            await _pause(per_token)
            last = index == len(generation.tokens)
            chunk = {"object": "chat.completion.chunk", "id": "", "created": created, "model": model,
                     "system_fingerprint": f"{TGI_VERSION}-native",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": token}, "logprobs": None,
                                  "finish_reason": _CHAT_FINISH[generation.finish_reason] if last else None}],
                     "usage": None}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def info(self) -> dict:
        """The body of GET /info."""
        cfg = self.config
        return {
            "model_id": cfg.model_id, "model_sha": cfg.model_sha, "model_pipeline_tag": cfg.task,
            # TGI reports the torch dtype's repr, e.g. "torch.float16" (its router passes the shard's str(dtype)).
            "model_device_type": "cuda", "model_dtype": "torch.float16",
            "max_concurrent_requests": cfg.max_concurrent_requests,
            "max_best_of": 2, "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_tokens": cfg.max_input_tokens,
            "max_total_tokens": cfg.max_total_tokens, "validation_workers": 2, "max_client_batch_size": 4,
            "router": "text-generation-router", "version": TGI_VERSION, "sha": TGI_SHA, "docker_label": None,
        }


_JSON_TOKEN = re.compile(r"\w+|\W", re.DOTALL)
_JSON_GRAMMARS = ("json", "json_object", "json_schema")


def _grammar_schema(grammar: object, field: str) -> dict | bool | None:
    """The JSON Schema a TGI grammar or chat ``response_format`` asks for; None for none (or a regex).

    TGI's shape is ``{"type": "json", "value": SCHEMA}`` (``json_object`` is an alias); ``json_schema``
    takes ``{"name": ..., "schema": SCHEMA}`` as its value, or OpenAI's ``"json_schema"`` key.
    """
    if grammar is None:
        return None
    if not isinstance(grammar, dict) or not isinstance(grammar.get("type"), str):
        raise Invalid(text_reply(422, "Failed to deserialize the JSON body into the target type: "
                                      f"{field}: missing field `type`"))
    kind = grammar["type"]
    if kind == "regex":
        return None  # not emulated: the answer is the usual words
    if kind not in _JSON_GRAMMARS:
        raise Invalid(text_reply(422, "Failed to deserialize the JSON body into the target type: "
                                      f"{field}.type: unknown variant `{kind}`, expected one of `json`, "
                                      "`json_object`, `json_schema`, `regex`"))
    value = grammar.get("value", grammar.get("json_schema"))
    if kind == "json_schema" and isinstance(value, dict) and "schema" in value:
        value = value["schema"]
    if value is None and kind == "json_object":
        return {"type": "object"}  # JSON mode without a schema: any object
    if not isinstance(value, (dict, bool)):
        raise _validation(f"{field}: the grammar's value must be a JSON Schema object")
    return value


def chat_prompt(messages: list) -> str:
    """The text of chat messages as one prompt (``role: text`` lines): the generator's seed and the stats key."""
    lines = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(part.get("text", "")) for part in content
                               if isinstance(part, dict) and part.get("type") == "text")
        lines.append(f"{message.get('role')}: {content or ''}")
    return "\n".join(lines)


def prompt_of(body: bytes) -> str | None:
    """The stats key of a request body (``inputs``, or the chat messages' text), or None if it has none."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("inputs"), str):
        return payload["inputs"]
    if isinstance(payload.get("messages"), list):
        return chat_prompt(payload["messages"])
    if isinstance(payload.get("prompt"), str):
        return payload["prompt"]
    return None


async def _pause(seconds: float) -> None:
    # Zero latency must not even yield to the loop: that is the emulator's ceiling path.
    if seconds > 0:
        await asyncio.sleep(seconds)


async def _open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


def _token_object(token: str) -> dict:
    # Token ids are a stable hash of the text, inside a 32k vocabulary like Llama's.
    return {"id": sum(token.encode()) * 131 % 32000, "text": token, "logprob": -0.25, "special": False}


def _split_words(sentence: str) -> list[str]:
    words = sentence.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


def _chain(first: list[str], rest):
    yield from first
    yield from rest
