"""The emulator plays Text Embeddings Inference: routes, errors, determinism, limits, capacity and lifecycle."""

from __future__ import annotations

import asyncio
import base64
import json
import math

import aiohttp
import numpy as np
import pytest
from emulator_helpers import AUTH, NS, TOKEN, config, endpoint, run, until

from batchrun.emulator import Emulator, EmulatorThread, EndpointConfig, Faults
from batchrun.emulator.tei import expected_embedding


def embedder(name: str = "emb", **overrides) -> EndpointConfig:
    values = {"task": "feature-extraction", "model_id": "BAAI/bge-small-en-v1.5", **overrides}
    return endpoint(name, **values)


async def call(http: aiohttp.ClientSession, url: str, path: str, payload: object) -> tuple[int, object]:
    async with http.post(url + path, json=payload) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


def serve(*endpoints: EndpointConfig, calls):
    """Start an emulator with ``endpoints`` and run ``calls(http, emu)`` against it."""
    async def body():
        async with Emulator(config(*endpoints)) as emu, aiohttp.ClientSession(
                headers=AUTH, connector=aiohttp.TCPConnector(limit=0)) as http:
            return await calls(http, emu)
    return run(body())


def url_of(emu: Emulator, name: str) -> str:
    return emu.endpoint_url(NS, name)


# ----- embeddings

def test_embed_answers_the_expected_vector_for_each_text_normalized_by_default():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        return (await call(http, url, "/embed", {"inputs": "What is Deep Learning?"}),
                await call(http, url, "/embed", {"inputs": ["first text", "second text"], "normalize": False}))

    (status, single), (batch_status, batch) = serve(embedder(), calls=calls)
    assert status == batch_status == 200
    assert single == [expected_embedding("What is Deep Learning?", 384)]
    assert math.isclose(float(np.linalg.norm(single[0])), 1.0, rel_tol=1e-5)
    assert batch == [expected_embedding("first text", 384, normalize=False),
                     expected_embedding("second text", 384, normalize=False)]
    assert float(np.linalg.norm(batch[0])) > 5  # unnormalized


def test_the_same_text_gives_the_same_vector_across_emulators_and_another_text_another():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        return [await call(http, url, "/embed", {"inputs": text}) for text in ("river", "river", "stone")]

    first = serve(embedder(embedding_dim=32), calls=calls)
    again = serve(embedder(embedding_dim=32), calls=calls)
    assert first == again
    assert first[0] == first[1] != first[2]
    assert len(first[0][1][0]) == 32


def test_prompt_name_prepends_the_configured_prompt_and_an_unknown_one_is_a_validation_error():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        return (await call(http, url, "/embed", {"inputs": "rivers", "prompt_name": "query"}),
                await call(http, url, "/embed", {"inputs": "rivers", "prompt_name": "nope"}))

    (status, vectors), (bad_status, error) = serve(embedder(prompts={"query": "search: "}), calls=calls)
    assert status == 200
    assert vectors == [expected_embedding("rivers", 384, prompt="search: ")]
    assert vectors != [expected_embedding("rivers", 384)]
    assert bad_status == 422
    assert error == {"error": "Input validation error: `default-prompt-name` is set to `nope` but it was not found "
                              'in the Sentence Transformers prompts. Available prompts: ["query"]',
                     "error_type": "Validation"}


def test_dimensions_cut_the_vector_before_it_is_normalized():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        return (await call(http, url, "/embed", {"inputs": "rivers", "dimensions": 16}),
                await call(http, url, "/embed", {"inputs": "rivers", "dimensions": 0}),
                await call(http, url, "/embed", {"inputs": "rivers", "dimensions": 999}))

    (status, vectors), (zero, zero_error), (big, big_error) = serve(embedder(), calls=calls)
    assert status == 200
    assert vectors == [expected_embedding("rivers", 384, dimensions=16)] == [expected_embedding("rivers", 16)]
    assert (zero, zero_error["error"]) == (422, "Input validation error: `dimensions` should be positive")
    assert big == 422 and "smaller than the maximum embedding dimension" in big_error["error"]


def test_openai_embeddings_route_answers_floats_or_base64_with_usage():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        return (await call(http, url, "/v1/embeddings", {"input": ["a river", "a stone."], "model": "x"}),
                await call(http, url, "/v1/embeddings", {"input": "a river", "encoding_format": "base64"}))

    (status, floats), (b64_status, packed) = serve(embedder(), calls=calls)
    assert status == b64_status == 200
    assert floats["object"] == "list" and floats["model"] == "BAAI/bge-small-en-v1.5"
    assert [item["index"] for item in floats["data"]] == [0, 1]
    assert floats["data"][0] == {"object": "embedding", "embedding": expected_embedding("a river", 384), "index": 0}
    # Tokens with the two special tokens: [CLS] a river [SEP] = 4, [CLS] a stone . [SEP] = 5.
    assert floats["usage"] == {"prompt_tokens": 9, "total_tokens": 9}
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == pytest.approx(expected_embedding("a river", 384), rel=1e-6)


def test_similarity_is_the_cosine_of_the_source_with_each_sentence():
    async def calls(http, emu):
        return await call(http, url_of(emu, "sim"), "/", {
            "inputs": {"source_sentence": "rivers", "sentences": ["rivers", "stones"]}})

    status, scores = serve(embedder("sim", task="sentence-similarity"), calls=calls)
    assert status == 200
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert abs(scores[1]) < 0.5


def test_tokenize_lists_tokens_with_special_tokens_and_byte_offsets():
    async def calls(http, emu):
        return await call(http, url_of(emu, "emb"), "/tokenize", {"inputs": "héllo world"})

    status, tokens = serve(embedder(), calls=calls)
    assert status == 200
    texts = [(t["text"], t["special"], t["start"], t["stop"]) for t in tokens[0]]
    assert texts == [("[CLS]", True, None, None), ("héllo", False, 0, 6), ("world", False, 7, 12),
                     ("[SEP]", True, None, None)]


# ----- rerank and predict

def test_rerank_sorts_by_score_and_the_text_sharing_the_query_words_ranks_first():
    async def calls(http, emu):
        return await call(http, url_of(emu, "rank"), "/rerank", {
            "query": "What is Deep Learning?", "texts": ["Paris is in France.", "Deep Learning is a kind of learning."],
            "return_text": True})

    status, ranks = serve(embedder("rank", task="text-ranking"), calls=calls)
    assert status == 200
    assert [rank["index"] for rank in ranks] == [1, 0]
    assert list(ranks[0]) == ["index", "text", "score"]
    assert ranks[0]["text"] == "Deep Learning is a kind of learning."
    assert ranks[0]["score"] > ranks[1]["score"] and all(0 < rank["score"] < 1 for rank in ranks)


def test_rerank_is_deterministic_and_raw_scores_are_logits():
    body = {"query": "rivers and stones", "texts": ["rivers", "stones", "clouds"], "raw_scores": True}

    async def calls(http, emu):
        url = url_of(emu, "rank")
        return [await call(http, url, "/rerank", body) for _ in range(2)]

    (status, first), (_, second) = serve(embedder("rank", task="text-ranking"), calls=calls)
    assert status == 200 and first == second
    assert "text" not in first[0]
    assert any(rank["score"] < 0 for rank in first)  # a logit, not a probability


def test_predict_gives_labels_sorted_by_score_one_list_per_input_for_a_batch():
    labels = ["negative", "neutral", "positive"]

    async def calls(http, emu):
        url = url_of(emu, "cls")
        return (await call(http, url, "/predict", {"inputs": "I love rivers"}),
                await call(http, url, "/predict", {"inputs": [["I love rivers"], ["I hate", "stones"]]}),
                await call(http, url, "/", {"inputs": "I love rivers"}))

    (status, single), (_, batch), (_, root) = serve(
        embedder("cls", task="text-classification", id2label=labels), calls=calls)
    assert status == 200
    assert sorted(p["label"] for p in single) == sorted(labels)
    assert [p["score"] for p in single] == sorted((p["score"] for p in single), reverse=True)
    assert sum(p["score"] for p in single) == pytest.approx(1.0, abs=1e-5)
    assert batch[0] == single and len(batch) == 2
    assert root == single


def test_routes_of_another_model_type_answer_424_backend():
    async def calls(http, emu):
        return (await call(http, url_of(emu, "emb"), "/rerank", {"query": "q", "texts": ["t"]}),
                await call(http, url_of(emu, "emb"), "/predict", {"inputs": "t"}),
                await call(http, url_of(emu, "cls"), "/embed", {"inputs": "t"}))

    results = serve(embedder(), embedder("cls", task="text-classification"), calls=calls)
    assert results == (
        (424, {"error": "Backend error: model is not a re-ranker model", "error_type": "Backend"}),
        (424, {"error": "Backend error: Model is not a classifier model", "error_type": "Backend"}),
        (424, {"error": "Backend error: Model is not an embedding model", "error_type": "Backend"}),
    )


# ----- info and limits

def test_info_reports_the_model_type_and_the_batch_limits():
    async def calls(http, emu):
        infos = []
        for name in ("emb", "cls", "rank"):
            async with http.get(url_of(emu, name) + "/info") as response:
                infos.append(await response.json())
        return infos

    emb, cls, rank = serve(embedder(max_client_batch_size=8, max_concurrent_requests=16),
                           embedder("cls", task="text-classification", id2label=["no", "yes"]),
                           embedder("rank", task="text-ranking"), calls=calls)
    assert list(emb) == ["model_id", "model_sha", "model_dtype", "served_model_name", "model_type",
                         "max_concurrent_requests", "max_input_length", "max_batch_tokens", "max_batch_requests",
                         "max_client_batch_size", "auto_truncate", "tokenization_workers", "version", "sha",
                         "docker_label"]
    assert emb["model_type"] == {"embedding": {"pooling": "cls"}}
    assert (emb["max_client_batch_size"], emb["max_concurrent_requests"], emb["max_input_length"]) == (8, 16, 512)
    assert (emb["version"], emb["auto_truncate"], emb["model_dtype"]) == ("1.9.3", True, "float16")
    assert cls["model_type"] == {"classifier": {"id2label": {"0": "no", "1": "yes"}, "label2id": {"no": 0, "yes": 1}}}
    assert rank["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}


@pytest.mark.parametrize(("version", "status"), [("1.9.3", 422), ("1.8.3", 413)])
def test_a_batch_over_max_client_batch_size_is_a_validation_error_whose_status_depends_on_the_version(version, status):
    async def calls(http, emu):
        url = url_of(emu, "emb")
        return (await call(http, url, "/embed", {"inputs": ["t"] * 5}),
                await call(http, url, "/v1/embeddings", {"input": ["t"] * 5}),
                await call(http, url, "/embed", {"inputs": ["t"] * 4}))

    (embed_status, error), (openai_status, openai_error), (ok, _) = serve(
        embedder(max_client_batch_size=4, tei_version=version), calls=calls)
    assert (embed_status, error) == (status, {"error": "batch size 5 > maximum allowed batch size 4",
                                              "error_type": "Validation"})
    assert (openai_status, openai_error) == (status, {"message": "batch size 5 > maximum allowed batch size 4",
                                                      "code": status, "type": "Validation"})
    assert ok == 200


@pytest.mark.parametrize(("version", "status"), [("1.9.3", 422), ("1.8.3", 413)])
def test_an_input_over_max_input_length_without_truncate_is_refused_and_truncated_with_it(version, status):
    words = " ".join(f"w{i}" for i in range(20))

    async def calls(http, emu):
        url = url_of(emu, "emb")
        return (await call(http, url, "/embed", {"inputs": words, "truncate": False}),
                await call(http, url, "/embed", {"inputs": words, "truncate": True}),
                await call(http, url, "/embed", {"inputs": words, "truncate": True, "truncation_direction": "Left"}))

    (refused, error), (cut, right), (_, left) = serve(
        embedder(max_input_length=10, tei_version=version), calls=calls)
    assert (refused, error) == (status, {"error": "Input validation error: `inputs` must have less than 10 tokens. "
                                                  "Given: 22", "error_type": "Validation"})
    assert cut == 200
    assert right == [expected_embedding(" ".join(f"w{i}" for i in range(8)), 384)]
    assert left == [expected_embedding(" ".join(f"w{i}" for i in range(12, 20)), 384)]


def test_auto_truncate_defaults_to_the_versions_default():
    words = " ".join(["word"] * 20)

    async def calls(http, emu):
        return [await call(http, url_of(emu, name), "/embed", {"inputs": words}) for name in ("new", "old")]

    (new_status, _), (old_status, _) = serve(embedder("new", max_input_length=10),
                                             embedder("old", max_input_length=10, tei_version="1.8.3"),
                                             calls=calls)
    assert (new_status, old_status) == (200, 413)


def test_empty_inputs_are_400_empty():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        return (await call(http, url, "/embed", {"inputs": ""}), await call(http, url, "/embed", {"inputs": []}))

    assert serve(embedder(), calls=calls) == (
        (400, {"error": "Input validation error: `inputs` cannot be empty", "error_type": "Empty"}),) * 2


def test_a_body_that_is_not_json_or_lacks_inputs_is_refused_in_plain_text_as_axum_does():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        async with http.post(url + "/embed", data=b"{", headers={"Content-Type": "application/json"}) as response:
            bad_json = response.status, response.content_type
        return bad_json, await call(http, url, "/embed", {"text": "x"})

    bad_json, (missing, text) = serve(embedder(), calls=calls)
    assert bad_json == (400, "text/plain")
    assert missing == 422 and "missing field `inputs`" in text


# ----- capacity

def test_past_max_concurrent_requests_counting_inputs_an_embed_batch_gets_429():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        held = asyncio.create_task(call(http, url, "/embed", {"inputs": ["a", "b", "c"]}))
        await until(lambda: emu.find(NS, "emb").admitted == 3, what="three inputs admitted")
        two = await call(http, url, "/embed", {"inputs": ["d", "e"]})
        held_done = held.done()
        one = await call(http, url, "/embed", {"inputs": "d"})
        return two, one, held_done, await held

    two, one, held_done, held = serve(embedder(max_concurrent_requests=4, latency_base_s=0.5), calls=calls)
    assert two == (429, {"error": "Model is overloaded", "error_type": "Overloaded"})  # 3 + 2 inputs > 4
    assert one[0] == 200  # 3 + 1 inputs fit, though it is a second request
    assert not held_done and held[0] == 200


def test_a_rerank_past_the_limit_runs_the_admitted_texts_then_answers_429():
    async def calls(http, emu):
        url = url_of(emu, "rank")
        held = asyncio.create_task(call(http, url, "/rerank", {"query": "q", "texts": ["a"]}))
        await until(lambda: emu.find(NS, "rank").admitted == 1, what="one text admitted")
        loop = asyncio.get_running_loop()
        started = loop.time()
        refused = await call(http, url, "/rerank", {"query": "q", "texts": ["b", "c", "d"]})
        return refused, loop.time() - started, await held

    refused, seconds, held = serve(embedder("rank", task="text-ranking", max_concurrent_requests=2,
                                            latency_base_s=0.3), calls=calls)
    assert refused == (429, {"error": "Model is overloaded", "error_type": "Overloaded"})
    assert seconds >= 0.25  # the one text that got a permit ran before the refusal
    assert held[0] == 200


def test_before_1_9_a_batch_past_the_limit_waits_for_permits_instead_of_429():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        held = asyncio.create_task(call(http, url, "/embed", {"inputs": ["a", "b", "c"]}))
        await until(lambda: emu.find(NS, "emb").admitted == 3, what="three inputs admitted")
        single = await call(http, url, "/embed", {"inputs": "x"})
        batch = await call(http, url, "/embed", {"inputs": ["d", "e", "f", "g", "h"]})
        return single, batch, await held

    single, batch, held = serve(embedder(max_concurrent_requests=3, latency_base_s=0.2, tei_version="1.8.3"),
                                calls=calls)
    assert single[0] == 429  # a single input is refused at once
    assert batch[0] == 200 and len(batch[1]) == 5  # a batch waits, then runs in waves
    assert held[0] == 200


def test_capacity_is_per_ready_replica():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        return [status for status, _ in await asyncio.gather(
            *(call(http, url, "/embed", {"inputs": [f"a{i}", f"b{i}"]}) for i in range(3)))]

    statuses = serve(embedder(max_concurrent_requests=2, min_replica=2, max_replica=2, latency_base_s=0.3),
                     calls=calls)
    assert sorted(statuses) == [200, 200, 429]


def test_latency_counts_forward_passes_of_max_batch_tokens():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, _ = await call(http, url, "/embed", {"inputs": ["one two", "three four", "five six"]})
        return status, loop.time() - started

    # Each input is 4 tokens with [CLS] and [SEP]; passes of at most 8 tokens: two passes of 0.1 s.
    status, seconds = serve(embedder(max_batch_tokens=8, max_input_length=8, latency_base_s=0.1), calls=calls)
    assert status == 200
    assert 0.2 <= seconds < 0.6


# ----- lifecycle, faults, stats

def test_the_control_plane_pauses_resumes_and_scales_a_tei_endpoint_as_a_tgi_one():
    async def calls(http, emu):
        url, control = url_of(emu, "emb"), f"{emu.api_url}/endpoint/{NS}/emb"
        paused = await call(http, url, "/embed", {"inputs": "x"})
        async with http.post(control + "/resume") as response:
            resume_status = response.status
        await until(lambda: emu.state(NS, "emb").state == "running", what="running")
        resumed = await call(http, url, "/embed", {"inputs": "x"})
        async with http.put(control, json={"compute": {"scaling": {"minReplica": 2, "maxReplica": 2}}}) as response:
            scale_status = response.status
        await until(lambda: emu.state(NS, "emb").ready_replicas == 2, what="two replicas")
        two_replicas = await asyncio.gather(*(call(http, url, "/embed", {"inputs": [f"a{i}", f"b{i}"]})
                                              for i in range(2)))
        async with http.post(control + "/pause") as response:
            pause_status = response.status
        return paused, resume_status, resumed, scale_status, two_replicas, pause_status, await call(
            http, url, "/embed", {"inputs": "x"})

    paused, resume_status, resumed, scale_status, two_replicas, pause_status, paused_again = serve(
        embedder(initial_state="paused", max_replica=2, max_concurrent_requests=2, latency_base_s=0.1), calls=calls)
    refusal = (400, "Bad Request: The endpoint is paused, ask a maintainer to restart it")
    assert paused == refusal == paused_again
    assert (resume_status, scale_status, pause_status) == (200, 200, 200)
    assert resumed[0] == 200
    assert [status for status, _ in two_replicas] == [200, 200]  # 4 inputs fit in 2 replicas x 2 permits


def test_an_injected_model_failure_is_a_424_backend_and_an_injected_429_is_overloaded():
    async def calls(http, emu):
        return (await call(http, url_of(emu, "fail"), "/embed", {"inputs": "x"}),
                await call(http, url_of(emu, "busy"), "/v1/embeddings", {"input": "x"}))

    failed, busy = serve(embedder("fail", faults=Faults(rate_500=1.0)),
                         embedder("busy", faults=Faults(rate_429_no_retry_after=1.0)), calls=calls)
    assert failed == (424, {"error": "Backend error: CUDA error: out of memory", "error_type": "Backend"})
    assert busy == (429, {"message": "Model is overloaded", "code": 429, "type": "Overloaded"})


def test_stats_count_requests_per_route_and_each_input_text():
    async def calls(http, emu):
        url = url_of(emu, "emb")
        await call(http, url, "/embed", {"inputs": ["a", "b"]})
        await call(http, url, "/embed", {"inputs": ["a"] * 99})
        await call(http, url, "/v1/embeddings", {"input": "a"})
        return emu.stats()["endpoints"][f"{NS}/emb"]

    stats = serve(embedder(), calls=calls)
    assert stats["by_route"] == {"POST /embed": {"200": 1, "422": 1}, "POST /v1/embeddings": {"200": 1}}
    assert stats["requests_per_prompt"]["b"] == 1
    assert stats["requests_per_prompt"]["a"] == 101


def test_the_config_refuses_an_unknown_version_and_reads_id2label_and_prompts_from_yaml_shapes():
    with pytest.raises(ValueError, match="tei_version"):
        EndpointConfig.from_dict({"name": "e", "task": "feature-extraction", "tei_version": "latest"})
    cfg = EndpointConfig.from_dict({"name": "e", "task": "text-classification", "id2label": {0: "no", "1": "yes"},
                                    "prompts": {"query": "q: "}})
    assert cfg.id2label == ("no", "yes")
    assert cfg.prompts == (("query", "q: "),)
    with pytest.raises(ValueError, match="max_input_length"):
        EndpointConfig(name="e", task="feature-extraction", max_input_length=1024, max_batch_tokens=512,
                       auto_truncate=False)


# ----- huggingface_hub's InferenceClient

@pytest.mark.usefixtures("hub_client_on_loopback")
def test_inference_client_feature_extraction_and_text_classification_read_the_answers():
    from huggingface_hub import InferenceClient

    cfg = config(embedder(embedding_dim=64), embedder("sim", task="sentence-similarity"),
                 embedder("cls", task="text-classification", id2label=["negative", "positive"]))
    with EmulatorThread(cfg) as emu:
        vectors = InferenceClient(model=emu.endpoint_url(NS, "emb"), token=TOKEN).feature_extraction(
            "What is Deep Learning?", normalize=True, truncate=True, truncation_direction="left")
        similarity = InferenceClient(model=emu.endpoint_url(NS, "sim"), token=TOKEN).sentence_similarity(
            "rivers", ["rivers", "stones"])
        top = InferenceClient(model=emu.endpoint_url(NS, "cls"), token=TOKEN).text_classification("I love it")
    assert vectors.dtype == np.float32 and vectors.shape == (1, 64)
    assert vectors[0].tolist() == pytest.approx(expected_embedding("What is Deep Learning?", 64), rel=1e-6)
    assert similarity[0] == pytest.approx(1.0, abs=1e-6) and len(similarity) == 2
    # TEI answers one input with a flat list of labels, best first; InferenceClient keeps the first one.
    assert top.label in ("negative", "positive") and 0.5 <= top.score <= 1
