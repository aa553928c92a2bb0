"""Every fault kind and scripted episode, and their reproducibility."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from emulator_helpers import AUTH, NS, config, endpoint, run, sleep_until, until

from batchrun.emulator import Emulator, EndpointConfig, Episode, Faults


async def send(url: str, prompt: str = "hello", *, timeout: float = 5.0) -> tuple[int | str, dict, bytes]:
    """One /generate request; transport failures come back as a name instead of a status."""
    try:
        async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.post(url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 4}}) as r:
                return r.status, dict(r.headers), await r.read()
    except TimeoutError:
        return "timeout", {}, b""
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
        return "reset", {}, b""


def one_fault(faults: Faults, prompt: str = "hello", timeout: float = 5.0):
    async def body():
        async with Emulator(config(endpoint("gen", faults=faults))) as emu:
            outcome = await send(emu.endpoint_url(NS, "gen"), prompt, timeout=timeout)
            # A handler cancelled by the client's hang-up records its status when it ends.
            await until(lambda: emu.stats()["endpoints"][f"{NS}/gen"]["in_flight"] == 0, what="the handler's end")
            return outcome, emu.stats()["endpoints"][f"{NS}/gen"]["by_route"]
    return run(body())


def test_429_with_retry_after_carries_the_configured_delay():
    (status, headers, body), _ = one_fault(Faults(rate_429=1.0, retry_after_s=2))
    assert status == 429
    assert headers["Retry-After"] == "2"
    assert json.loads(body) == {"error": "Model is overloaded", "error_type": "overloaded"}


def test_429_without_retry_after_is_tgis_own_overload_answer():
    (status, headers, body), _ = one_fault(Faults(rate_429_no_retry_after=1.0))
    assert status == 429
    assert "Retry-After" not in headers
    assert json.loads(body)["error_type"] == "overloaded"


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_server_error_faults_answer_their_status(code):
    (status, _, _), by_route = one_fault(Faults(**{f"rate_{code}": 1.0}))
    assert status == code
    assert by_route["POST /generate"] == {str(code): 1}


def test_a_connection_reset_fault_breaks_the_connection_without_an_answer():
    (status, _, _), by_route = one_fault(Faults(rate_reset=1.0))
    assert status == "reset"
    assert by_route["POST /generate"] == {"reset": 1}


def test_a_hanging_request_never_answers_before_the_client_gives_up():
    (status, _, _), by_route = one_fault(Faults(rate_hang=1.0, hang_s=30), timeout=0.2)
    assert status == "timeout"
    assert by_route["POST /generate"] == {"hang": 1}


def test_a_hang_ends_with_the_connection_closed_after_hang_s():
    (status, _, _), _ = one_fault(Faults(rate_hang=1.0, hang_s=0.1))
    assert status == "reset"


def test_a_200_with_an_error_body_looks_like_success_on_the_wire():
    (status, _, body), _ = one_fault(Faults(rate_error_body=1.0))
    assert status == 200
    assert json.loads(body)["error_type"] == "generation"
    assert "generated_text" not in json.loads(body)


def test_a_truncated_200_body_is_not_valid_json():
    (status, headers, body), _ = one_fault(Faults(rate_truncated=1.0))
    assert status == 200
    assert int(headers["Content-Length"]) == len(body)
    with pytest.raises(ValueError):
        json.loads(body)


def fault_sequence(seed: int, prompts: list[str]) -> list:
    async def body():
        faults = Faults(rate_503=0.2, rate_429_no_retry_after=0.2, rate_500=0.1, seed=seed)
        async with Emulator(config(endpoint("gen", faults=faults))) as emu:
            url = emu.endpoint_url(NS, "gen")
            # Concurrent: the outcome of a request must not depend on arrival order.
            outcomes = await asyncio.gather(*(send(url, p) for p in prompts))
            return [status for status, _, _ in outcomes]
    return run(body())


def test_faults_are_reproducible_for_the_same_seed_and_differ_for_another():
    prompts = [f"prompt {i}" for i in range(60)] * 2  # each prompt twice: the retry draws again
    first = fault_sequence(7, prompts)
    assert fault_sequence(7, prompts) == first
    assert fault_sequence(8, prompts) != first
    assert {200, 429, 500, 503} <= set(first)
    assert first[:60] != first[60:]  # a second attempt of the same body meets a fresh draw
    assert 0.3 <= first.count(200) / len(first) <= 0.7


def test_an_outage_episode_answers_503_to_everything_for_its_seconds():
    async def body():
        # Long enough for three requests on a slow machine; the end is awaited on the emulator's clock.
        cfg = endpoint("gen", episodes=(Episode(kind="outage_503", after_requests=2, seconds=0.5),))
        async with Emulator(config(cfg)) as emu:
            url = emu.endpoint_url(NS, "gen")
            before = (await send(url))[0]
            during = [(await send(url, f"p{i}"))[0] for i in range(3)]
            # The outage began with the first of these, so it ends by the loop time seen now + 0.5 s.
            await sleep_until(asyncio.get_running_loop().time() + 0.5)
            after = (await send(url))[0]
            return before, during, after

    assert run(body()) == (200, [503, 503, 503], 200)


def test_a_lost_replica_gives_503s_until_it_has_restarted():
    async def body():
        async with Emulator(config(endpoint("gen", replica_start_s=0.15))) as emu:
            url = emu.endpoint_url(NS, "gen")
            emu.lose_replica(NS, "gen")
            state = emu.state(NS, "gen")
            lost = (state.state, state.ready_replicas, (await send(url))[0])
            await until(lambda: state.ready_replicas == 1, what="the replica restarted")
            return lost, state.ready_replicas, (await send(url))[0]

    assert run(body()) == (("running", 0, 503), 1, 200)


def test_an_endpoint_failing_while_a_job_runs_goes_failed_and_stops_serving():
    async def body():
        cfg = endpoint("gen", episodes=(Episode(kind="fail_endpoint", at_s=0.5),))
        async with Emulator(config(cfg)) as emu:
            url = emu.endpoint_url(NS, "gen")
            first = (await send(url))[0]
            state = emu.state(NS, "gen")
            await until(lambda: state.state == "failed", what="the endpoint failed")
            return first, state.state, state.url, (await send(url))[0], state.billable_seconds()

    first, state, url, later, _ = run(body())
    assert (first, state, url, later) == (200, "failed", None, 503)


def test_inject_starts_an_outage_at_runtime():
    async def body():
        async with Emulator(config(endpoint("gen"))) as emu:
            url = emu.endpoint_url(NS, "gen")
            emu.inject(NS, "gen", "outage_503", seconds=0.5)
            ends_by = asyncio.get_running_loop().time() + 0.5  # on the clock the emulator times it with
            during = (await send(url))[0]
            await sleep_until(ends_by)
            return during, (await send(url))[0]

    assert run(body()) == (503, 200)


def test_requests_per_prompt_count_every_attempt_including_refused_and_faulted_ones():
    async def body():
        faults = Faults(rate_503=0.5, seed=3)
        async with Emulator(config(endpoint("gen", faults=faults))) as emu:
            url = emu.endpoint_url(NS, "gen")
            statuses = [(await send(url, "same prompt"))[0] for _ in range(8)]
            return statuses, emu.stats()["endpoints"][f"{NS}/gen"]["requests_per_prompt"]

    statuses, per_prompt = run(body())
    assert {200, 503} <= set(statuses)
    assert per_prompt == {"same prompt": 8}


def faulted_request_numbers(fault_seed: int, requests: int = 80) -> set[int]:
    """The 1-based numbers of the requests that met a fault, one fresh emulator (a run of a job) per call."""
    async def body():
        cfg = endpoint("gen", fault_seed=fault_seed, faults=Faults(rate_503=0.3, seed=5))
        async with Emulator(config(cfg)) as emu:
            url = emu.endpoint_url(NS, "gen")
            statuses = [(await send(url, f"row {i}"))[0] for i in range(requests)]
            return {number for number, status in enumerate(statuses, 1) if status != 200}
    return run(body())


def test_the_fault_seed_replays_the_same_faults_and_another_fault_seed_draws_others():
    first_run = faulted_request_numbers(fault_seed=1)
    assert first_run, "a 30% fault rate over 80 requests faults some"
    assert faulted_request_numbers(fault_seed=1) == first_run
    second_run = faulted_request_numbers(fault_seed=2)
    assert second_run != first_run
    # A rerun retries the rows that failed: under another fault_seed most of them now succeed.
    assert len(first_run & second_run) < len(first_run)


def test_fault_seed_is_a_checked_config_key():
    assert EndpointConfig.from_dict({"name": "x", "fault_seed": 3}).fault_seed == 3
    with pytest.raises(ValueError, match="fault_seed: expected int"):
        EndpointConfig.from_dict({"name": "x", "fault_seed": "3"})
    with pytest.raises(ValueError, match="fault_seed: must fit in 64 bits"):
        EndpointConfig(name="x", fault_seed=2**64)
