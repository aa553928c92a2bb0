"""Whole jobs against the emulated Inference Providers router: a lane's rate limits are held, not discovered.

Windows are a second long so that each job takes seconds; what is asserted are shares (of the limit, of
requests), never wall-clock limits. What the spec says of limits, read without a server, is in
tests/unit/test_target_specs.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from jobkit import TOKEN, run, write_spec, write_topics

from batchrun.emulator import EmulatorConfig, EmulatorThread
from batchrun.emulator.router_config import ProviderConfig, RouterConfig

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
MAX_TOKENS = 12


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def router(*providers: ProviderConfig) -> EmulatorThread:
    return EmulatorThread(EmulatorConfig(token=TOKEN, endpoints=[], router=RouterConfig(providers=providers)))


def root(emu: EmulatorThread) -> str:
    """The router's server root: the chat task adds /v1/chat/completions."""
    return emu.router_url.removesuffix("/v1")


def provider_stats(emu: EmulatorThread, name: str) -> dict[str, Any]:
    return emu.router_stats()["providers"][name]


def charged(stats: dict[str, Any]) -> int:
    """Tokens the provider counted against its limit: each answered request's prompt plus max_tokens."""
    return stats["prompt_tokens"] + MAX_TOKENS * stats["by_status"].get("200", 0)


class Sampler:
    """Samples a provider's charged tokens every few milliseconds while a job runs (another thread)."""

    def __init__(self, emu: EmulatorThread, name: str) -> None:
        self.emu, self.name = emu, name
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.monotonic(), charged(provider_stats(self.emu, self.name))))
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def share_of_limit(self, per_window: int, window_s: float = 1.0) -> float:
        """Tokens counted over the whole windows since the first, as a share of what they allowed."""
        started = next(t for t, tokens in self.samples if tokens > 0)
        last = max(t for t, tokens in self.samples if tokens == self.samples[-1][1])
        windows = int((last - started) / window_s)
        assert windows >= 2, "the job should span several windows"
        end = started + windows * window_s
        used = max(tokens for t, tokens in self.samples if t <= end)
        return used / (windows * per_window)


def job(tmp_path: Path, url: str | list[str], rows: int, **overrides: Any) -> Path:
    endpoint: Any = overrides.pop("endpoint", [{"url": u} for u in url] if isinstance(url, list) else {"url": url})
    return write_spec(tmp_path, endpoint=endpoint, input_path=write_topics(tmp_path / "in.parquet", rows),
                      parameters={"max_tokens": MAX_TOKENS, "seed": 1, "model": LLAMA}, **overrides)


def test_a_tpm_limit_announced_in_headers_is_held_with_few_429s_and_used_to_at_least_nine_tenths(tmp_path):
    tpm = 1500  # per second: about 60 requests of ~25 tokens
    limited = ProviderConfig(name="together", models=(LLAMA,), tpm=tpm, window="second", retry_after="none",
                             latency_s=0.03)
    with router(limited) as emu, Sampler(emu, "together") as sampler:
        outcome, _ = run(job(tmp_path, root(emu), 320))
        stats = provider_stats(emu, "together")
    assert outcome.summary["rows"]["ok"] == 320
    assert stats["rate_limited_429"] / stats["requests"] < 0.02, stats
    assert sampler.share_of_limit(tpm) >= 0.9


def test_a_provider_without_headers_or_retry_after_loses_no_row(tmp_path):
    silent = ProviderConfig(name="silent", models=(LLAMA,), tpm=800, window="second", rate_limit_headers=False,
                            retry_after="none", latency_s=0.02)
    with router(silent) as emu:
        outcome, _ = run(job(tmp_path, root(emu), 120))
        stats = provider_stats(emu, "silent")
    assert stats["rate_limited_429"] > 0  # it was over the limit, and said so only by 429s
    assert outcome.summary["rows"] == {**outcome.summary["rows"], "ok": 120, "failed": 0}
    # Each 429 paused the lane, and after each pause one request went first: no storm of retries (a lane
    # that resent at once would take hundreds of 429s a second here), though with nothing to say how much
    # the provider takes, each window still ends in a few.
    assert stats["rate_limited_429"] < 2 * 120


def test_a_429_without_retry_after_backs_that_lane_off_while_another_lane_serves(tmp_path):
    tight = ProviderConfig(name="tight", models=(LLAMA,), tpm=200, window="second", rate_limit_headers=False,
                           retry_after="none", latency_s=0.02)
    roomy = ProviderConfig(name="roomy", models=(LLAMA,), latency_s=0.02)
    with router(tight) as slow, router(roomy) as fast:
        outcome, _ = run(job(tmp_path, [root(slow), root(fast)], 600))
        tight_stats, roomy_stats = provider_stats(slow, "tight"), provider_stats(fast, "roomy")
    assert outcome.summary["rows"]["ok"] == 600 and outcome.summary["rows"]["failed"] == 0
    assert roomy_stats["by_status"]["200"] > 0.8 * 600
    # The throttled lane was paused, not hammered: its 429s (the first burst, then one per pause) are a
    # small share of all requests.
    assert tight_stats["rate_limited_429"] < 0.1 * (tight_stats["requests"] + roomy_stats["requests"])


def test_a_daily_limit_spent_stops_the_job_resumably_with_its_rows_kept(tmp_path):
    daily = ProviderConfig(name="daily", models=(LLAMA,), rpm=5, window="day", retry_after="none")
    with router(daily) as emu:
        outcome, _ = run(job(tmp_path, root(emu), 20, outage_timeout="30s"))
        stats = provider_stats(emu, "daily")
    assert outcome.exit_code == 3  # stopped early: run it again tomorrow
    rows = outcome.summary["rows"]
    assert rows["ok"] == stats["by_status"]["200"] <= 5 and rows["failed"] == 0
    assert "rate limit" in str(outcome.summary.get("stop_reason"))
