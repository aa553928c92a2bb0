"""What a job costs while it runs, and when a budget or deadline says stop.

Dedicated endpoints bill per replica for as long as replicas are starting or running. The meter
integrates the replica count over time from the moment the job asks for the endpoint (resume)
until it releases it (pause), which slightly over-counts a cold start and never under-counts.

Serverless targets (the Inference Providers router, an OpenAI-compatible API) bill per token: the same
meter is charged each answer's tokens (:meth:`CostMeter.charge`) at the target's :class:`TokenPrice`
(the spec's ``price``, or the router's pricing of the provider that answered). A provider's images are
billed per image or per megapixel (:meth:`CostMeter.charge_image`, the spec's ``price``). One interface covers
both, so the budget, progress and the summary read ``usd`` whichever way it was spent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchrun.stop import Stop, StopReason

__all__ = ["BudgetGuard", "CostMeter", "ImagePrice", "Spent", "TokenPrice"]

#: The share of a budget (or a deadline) kept back at most for the stop itself (drain, commit, pause).
MARGIN_SHARE = 0.1

#: How often the guard looks at the meter and the clock while a job runs.
CHECK_EVERY_S = 0.25


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """What a serverless target charges, in USD per million prompt and completion tokens."""

    input_per_mtok: float
    output_per_mtok: float

    def usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The price of one answer's tokens."""
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1_000_000


@dataclass(frozen=True, slots=True)
class ImagePrice:
    """What a provider charges for one image: a price per image, plus one per megapixel (either may be 0)."""

    per_image: float = 0.0
    per_megapixel: float = 0.0

    def usd(self, width: int | None, height: int | None) -> float:
        """The price of one image of ``width`` x ``height`` pixels (a size not known counts no megapixels)."""
        return self.per_image + self.per_megapixel * (width or 0) * (height or 0) / 1_000_000

    def __str__(self) -> str:
        parts = [f"${self.per_image:g} per image"] if self.per_image or not self.per_megapixel else []
        return ", ".join([*parts, *([f"${self.per_megapixel:g} per megapixel"] if self.per_megapixel else [])])


class CostMeter:
    """Billable replica-seconds from acquire to release, priced per replica-hour when a price is known;
    and, for a target billed per token, the tokens of every answer, priced per token.

    ``token_price`` is the price the spec gives; ``provider_prices`` (the router's pricing, filled in by
    the endpoint's check) price an answer by the provider that served it when the spec gives none.
    """

    def __init__(self, price_per_replica_hour: float | None, *, token_price: TokenPrice | None = None,
                 per_token: bool = False, image_price: ImagePrice | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.price_per_replica_hour = price_per_replica_hour
        self.token_price = token_price
        self.image_price = image_price  # a provider's text-to-image, per image (or megapixel)
        self.images = 0
        self.provider_prices: dict[str, TokenPrice] = {}
        self.per_token = per_token or token_price is not None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.unpriced_answers = 0  # answers no price was known for (their cost is not in usd)
        self.saved_usd = 0.0  # what answers charged below the online price (batch, flex) did not cost
        self.dearest_answer_usd = 0.0  # the most one answer has cost: the budget's margin per request in flight
        self._token_usd = 0.0
        self._on_charge: list[Callable[[], None]] = []
        self._clock = clock
        self._started: float | None = None
        self._stopped: float | None = None
        self._since = 0.0
        self._replicas = 0
        self._replica_seconds = 0.0

    def start(self, replicas: int) -> None:
        """The endpoint is being brought up (or used) with ``replicas`` replicas billing."""
        if self._started is None:
            self._started = self._since = self._clock()
            self._replicas = max(1, replicas)

    def set_replicas(self, replicas: int) -> None:
        """The billing replica count changed (scale-up, a lost replica)."""
        if self._started is None or self._stopped is not None:
            return
        now = self._clock()
        self._replica_seconds += (now - self._since) * self._replicas
        self._since, self._replicas = now, max(1, replicas)

    def stop(self) -> None:
        """The endpoint was released: billing by this job ends."""
        if self._started is not None and self._stopped is None:
            self.set_replicas(self._replicas)
            self._stopped = self._clock()

    def price_for(self, provider: str | None) -> TokenPrice | None:
        """The price of an answer ``provider`` served: the spec's, else the router's for that provider."""
        if self.token_price is not None:
            return self.token_price
        if provider is not None and provider in self.provider_prices:
            return self.provider_prices[provider]
        return self.provider_prices.get("") if provider is None else None

    def charge(self, prompt_tokens: int | None, completion_tokens: int | None, *,
               provider: str | None = None, factor: float = 1.0) -> float | None:
        """Count one answer's tokens; its cost in USD, or None when no price (or no token count) is known.

        ``factor`` is the share of the online price it is charged at (a batch answer: the discount)."""
        prompt, completion = prompt_tokens or 0, completion_tokens or 0
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        price = self.price_for(provider)
        if price is None or (prompt_tokens is None and completion_tokens is None):
            self.unpriced_answers += 1
            return None
        return self._spend(price.usd(prompt, completion), factor)

    def charge_image(self, width: int | None = None, height: int | None = None) -> float | None:
        """Count one image of ``width`` x ``height``; its cost in USD (``image_price``), or None without a price."""
        self.images += 1
        if self.image_price is None:
            self.unpriced_answers += 1
            return None
        return self._spend(self.image_price.usd(width, height), 1.0)

    def _spend(self, online: float, factor: float) -> float:
        usd = online * factor
        self._token_usd += usd
        self.saved_usd += online - usd
        self.dearest_answer_usd = max(self.dearest_answer_usd, usd)
        for listener in self._on_charge:
            listener()
        return usd

    def on_charge(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every answer charged (the budget looks at once, not at its next turn)."""
        self._on_charge.append(listener)

    @property
    def token_usd(self) -> float:
        """What the answers cost so far: their tokens (or images), billed per answer."""
        return self._token_usd

    @property
    def billed(self) -> bool:
        """Whether anything was billed: replica time, or tokens."""
        return bool(self.replica_seconds) or bool(self.prompt_tokens or self.completion_tokens or self.images)

    @property
    def running(self) -> bool:
        return self._started is not None and self._stopped is None

    @property
    def replicas(self) -> int:
        return self._replicas

    @property
    def replica_seconds(self) -> float:
        if self._started is None or (self.per_token and self.price_per_replica_hour is None):
            return 0.0  # a target billed per token has no replicas: its meter runs only for the spending rate
        live = (self._clock() - self._since) * self._replicas if self._stopped is None else 0.0
        return self._replica_seconds + live

    @property
    def priced(self) -> bool:
        """Whether any price is known: per replica-hour, or per token (the spec's, or the router's)."""
        return (self.price_per_replica_hour is not None or self.token_price is not None or bool(self.provider_prices)
                or self.image_price is not None)

    @property
    def usd(self) -> float | None:
        if not self.priced:
            return None
        hourly = self.price_per_replica_hour
        replica = 0.0 if hourly is None else self.replica_seconds / 3600 * hourly
        return replica + self.token_usd

    def replica_usd_per_second(self) -> float | None:
        """What the replicas cost per second now; None without a price per replica-hour."""
        if self.price_per_replica_hour is None:
            return None
        return self._replicas * self.price_per_replica_hour / 3600

    def usd_per_second(self) -> float | None:
        """The spending rate: the replicas' now, plus the tokens' over the time the target was in use."""
        rate = self.replica_usd_per_second()
        if not self.per_token:
            return rate
        elapsed = self.elapsed_s
        token_rate = self.token_usd / elapsed if elapsed > 0 else 0.0
        return (rate or 0.0) + token_rate

    @property
    def elapsed_s(self) -> float:
        """How long the target has been in use by this run."""
        if self._started is None:
            return 0.0
        return (self._stopped if self._stopped is not None else self._clock()) - self._started

    def projected_usd(self, *, done: int, remaining: int | None, elapsed_s: float) -> float | None:
        """Spent so far plus the remaining rows: at the tokens' cost per row so far, and at the current row
        rate and replica count."""
        spent, rate = self.usd, self.replica_usd_per_second()
        if spent is None or remaining is None or done <= 0 or elapsed_s <= 0:
            return None
        projected = spent + remaining * self.token_usd / done
        if rate is not None:
            projected += remaining / (done / elapsed_s) * rate
        return projected


@dataclass(frozen=True, slots=True)
class Spent:
    """What a job has spent over all its runs (``state/spend.json``): a budget is per job, not per run
    (reliability.md §3). A billing run saves it every few seconds, so a run killed with SIGKILL loses at
    most those seconds from it."""

    usd: float = 0.0
    replica_hours: float = 0.0
    runs: int = 0
    saved_usd: float = 0.0  # what batch (or flex) mode saved against the online price

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> Spent:
        """Read back what :meth:`record` wrote; nothing (or something unreadable) is nothing spent."""
        try:
            return cls(usd=float(record["usd"]), replica_hours=float(record["replica_hours"]),
                       runs=int(record["runs"]), saved_usd=float(record.get("saved_usd", 0.0))) if record else cls()
        except (KeyError, TypeError, ValueError):
            return cls()

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"usd": self.usd, "replica_hours": self.replica_hours, "runs": self.runs}
        if self.saved_usd:
            record["saved_usd"] = self.saved_usd
        return record


class BudgetGuard:
    """Says when to stop so that neither ``max_usd`` (over all the job's runs) nor this run's
    ``deadline`` is crossed.

    ``margin_s`` is the time a stop takes (drain, commit, pause): the guard stops that long before the
    money or the time runs out, but never keeps back more than a tenth of the budget or of the
    deadline, so a small budget is not stopped at once. ``spent_before`` is what earlier runs spent.
    """

    def __init__(
        self,
        *,
        max_usd: float | None,
        deadline_s: float | None,
        margin_s: float,
        started_at: float,
        spent_before: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.max_usd = max_usd
        self.deadline_s = deadline_s
        self.margin_s = margin_s
        self.spent_before = spent_before
        self._started_at = started_at
        self._clock = clock
        # Requests sent and not yet answered: on a target billed per token, each may still cost up to the
        # dearest answer so far, so the budget keeps that much back (uncapped: it must not be crossed).
        self._in_flight = in_flight

    def describe(self, meter: CostMeter) -> str | None:
        """The stop margins, said once at the start of a run."""
        parts = []
        if self.max_usd is not None:
            rate = meter.usd_per_second()
            margin = self._usd_margin(rate or 0.0)
            keeps = (f"stops with ${margin:.4f} left for the drain and the pause" if not meter.per_token else
                     "stops while what the requests in flight may cost still fits")
            parts.append(f"budget ${self.max_usd:g} (${self.spent_before:.4f} spent by earlier runs; {keeps})")
        if self.deadline_s is not None:
            parts.append(f"deadline {self.deadline_s:g}s for this run (stops {self._time_margin():.0f}s before it)")
        return "; ".join(parts) or None

    def _time_margin(self) -> float:
        if self.deadline_s is None:
            return self.margin_s
        return min(self.margin_s, MARGIN_SHARE * self.deadline_s)

    def _usd_margin(self, rate: float) -> float:
        assert self.max_usd is not None
        return min(rate * self.margin_s, MARGIN_SHARE * self.max_usd)

    @property
    def active(self) -> bool:
        return self.max_usd is not None or self.deadline_s is not None

    def check(self, meter: CostMeter) -> tuple[StopReason, str] | None:
        """A reason to stop now, or None."""
        if self.deadline_s is not None:
            elapsed = self._clock() - self._started_at
            if elapsed + self._time_margin() >= self.deadline_s:
                return StopReason.DEADLINE, f"the deadline of {self.deadline_s:.0f}s is near ({elapsed:.0f}s elapsed)"
        if self.max_usd is not None:
            spent, rate = meter.usd, meter.usd_per_second()
            if spent is not None and rate is not None:
                total = self.spent_before + spent
                # The requests in flight, and the one a freed slot would send next.
                pending = meter.dearest_answer_usd * (self._in_flight() + 1 if self._in_flight is not None else 0)
                if total + max(self._usd_margin(meter.replica_usd_per_second() or 0.0), pending) >= self.max_usd:
                    return StopReason.BUDGET, (
                        f"the budget of ${self.max_usd:g} is nearly spent (${total:.4f} over this job's runs); "
                        "raise budget.max_usd to go on"
                    )
        return None

    async def watch(self, meter: CostMeter, stop: Stop) -> None:
        """Until cancelled or stopped: request a stop when the budget or the deadline says so."""
        if not self.active:
            return
        if self.max_usd is not None and meter.per_token:  # each answer's cost is looked at as it comes

            def look() -> None:
                reason = None if stop.requested else self.check(meter)
                if reason is not None:
                    stop.request(*reason)

            meter.on_charge(look)
        while not stop.requested:
            reason = self.check(meter)
            if reason is not None:
                stop.request(*reason)
                return
            await asyncio.sleep(CHECK_EVERY_S)
