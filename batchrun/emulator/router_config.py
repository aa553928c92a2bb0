"""Configuration of the emulated Inference Providers router and its OpenAI-compatible batch API.

The ``router:`` section of an emulator config. Frozen, keyword-only dataclasses; ``RouterConfig.from_dict``
is the edge where YAML comes in, and its ``ValueError`` names the key (``router.providers[1].rpm: ...``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from batchrun.emulator.config_values import checked_value

WINDOWS = {"second": 1.0, "minute": 60.0, "day": 86400.0}
RETRY_AFTER = ("seconds", "ms", "both", "none")
PROVIDER_STATUSES = ("live", "staging", "offline", "error")
OUTAGE_KINDS = ("500", "502", "503", "504", "reset")
#: The providers whose text-to-image routes the router plays (batchrun.emulator.router_images).
IMAGE_PROVIDERS = ("hf-inference", "nscale", "together")


@dataclass(frozen=True, kw_only=True)
class Outage:
    """A provider goes down: every request it gets answers ``kind`` (a 5xx, or a TCP reset) for ``seconds``,
    starting ``at_s`` seconds after the router's first inference request."""

    at_s: float
    seconds: float
    kind: str = "503"

    def __post_init__(self) -> None:
        if self.kind not in OUTAGE_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(OUTAGE_KINDS)}, got {self.kind!r}")
        if self.at_s < 0 or self.seconds <= 0:
            raise ValueError("at_s/seconds: at_s must not be negative and seconds must be positive")


@dataclass(frozen=True, kw_only=True)
class ProviderConfig:
    """One inference provider behind the router: what it serves, what it costs, how it limits and fails."""

    name: str
    models: tuple[str, ...] = ()
    # USD per 1M tokens, as GET /v1/models shows them.
    price_input: float = 0.2
    price_output: float = 0.6
    context_length: int = 32768
    status: str = "live"
    supports_tools: bool = True
    supports_structured_output: bool = False
    completions: bool = False  # whether it also serves POST /v1/completions
    # Rate limits: requests and tokens (prompt tokens + max_tokens) per window; 0 = unlimited.
    rpm: int = 0
    tpm: int = 0
    window: str = "minute"  # second | minute | day: providers count over different windows
    rate_limit_headers: bool = True  # x-ratelimit-{limit,remaining,reset}-{requests,tokens} on every answer
    retry_after: str = "seconds"  # on its rate-limit 429: Retry-After, retry-after-ms, both or none
    rate_429: float = 0.0  # share of requests answered 429 without Retry-After whatever the limits
    cached_tokens: bool = False  # report usage.prompt_tokens_details.cached_tokens (a repeated message prefix)
    latency_s: float = 0.0
    latency_per_token_s: float = 0.0
    outages: tuple[Outage, ...] = ()
    seed: int = 0  # seeds the rate_429 draws
    # Text-to-image (IMAGE_PROVIDERS only): each HF model id it serves, with the provider's own id for it.
    image_models: tuple[tuple[str, str], ...] = ()
    price_image: float = 0.003  # USD per image
    image_latency_s: float = 0.0

    @property
    def window_s(self) -> float:
        """The length of the rate-limit window, seconds."""
        return WINDOWS[self.window]

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or ":" in self.name:
            raise ValueError(f"name: expected a provider name without '/' or ':', got {self.name!r}")
        if self.window not in WINDOWS:
            raise ValueError(f"window: expected one of {', '.join(WINDOWS)}, got {self.window!r}")
        if self.retry_after not in RETRY_AFTER:
            raise ValueError(f"retry_after: expected one of {', '.join(RETRY_AFTER)}, got {self.retry_after!r}")
        if self.status not in PROVIDER_STATUSES:
            raise ValueError(f"status: expected one of {', '.join(PROVIDER_STATUSES)}, got {self.status!r}")
        if not 0.0 <= self.rate_429 <= 1.0:
            raise ValueError(f"rate_429: must be between 0 and 1, got {self.rate_429!r}")
        for key in ("rpm", "tpm", "price_input", "price_output", "latency_s", "latency_per_token_s", "price_image",
                    "image_latency_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must not be negative")
        if self.context_length < 2:
            raise ValueError("context_length: must be at least 2")
        for model in self.models:
            if model.count("/") != 1:
                raise ValueError(f"models: expected ORG/NAME ids, got {model!r}")
        self._check_image_models()

    def _check_image_models(self) -> None:
        if self.image_models and self.name not in IMAGE_PROVIDERS:
            raise ValueError(f"image_models: the router plays the text-to-image routes of {', '.join(IMAGE_PROVIDERS)} "
                             f"only, not {self.name}'s")
        for model, provider_id in self.image_models:
            if model.count("/") != 1 or not provider_id:
                raise ValueError(f"image_models: expected ORG/NAME ids, got {model!r}")
            if self.name == "hf-inference" and provider_id != model:  # it serves the Hub's ids as they are
                raise ValueError(f"image_models: hf-inference serves {model} under that id, not {provider_id!r}")

    def image_model(self, provider_id: str) -> str | None:
        """The HF model id this provider serves for text-to-image as ``provider_id``, or None."""
        return next((model for model, own in self.image_models if own == provider_id), None)


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """The OpenAI-compatible batch API on the router's port: timing, failures and limits."""

    validating_s: float = 0.05  # validating, before in_progress (or failed)
    completion_s: float = 1.0  # in_progress: requests finish evenly over this time
    finalizing_s: float = 0.05
    cancel_s: float = 0.05  # cancelling, before cancelled
    expire_after_s: float | None = None  # a batch not finished this long after creation expires (partial results)
    error_rate: float = 0.0  # share of requests answered with an error line (seeded by custom_id)
    max_requests: int = 50_000  # per batch: more fails validation
    max_file_bytes: int = 200 * 1024 * 1024  # per uploaded file: more is refused at upload
    fail_first: int = 0  # the first N batches created fail validation whatever their file (`invalid_file`)
    price_factor: float = 0.5  # batch price = this x the online price
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("validating_s", "completion_s", "finalizing_s", "cancel_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must not be negative")
        if self.expire_after_s is not None and self.expire_after_s <= 0:
            raise ValueError("expire_after_s: must be positive (or null: never)")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate: must be between 0 and 1, got {self.error_rate!r}")
        if self.fail_first < 0:
            raise ValueError("fail_first: must not be negative")
        if self.max_requests < 1 or self.max_file_bytes < 1:
            raise ValueError("max_requests/max_file_bytes: must be at least 1")


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """The router: its loopback port, its providers (in the user's preference order) and the batch API."""

    port: int = 0
    providers: tuple[ProviderConfig, ...] = ()
    reasoning_models: tuple[str, ...] = ()  # their usage carries completion_tokens_details.reasoning_tokens
    batch: BatchConfig = field(default_factory=BatchConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535 (0 picks a free port), got {self.port}")
        names = [p.name for p in self.providers]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"providers: {name} is defined twice")

    def models(self) -> list[str]:
        """Every model some provider serves, in first-seen order."""
        seen: dict[str, None] = {}
        for provider in self.providers:
            for model in provider.models:
                seen.setdefault(model, None)
        return list(seen)

    @classmethod
    def from_dict(cls, data: Any) -> RouterConfig:
        """Build from YAML's dict; a ValueError names the key under ``router.``."""
        if not isinstance(data, dict):
            raise ValueError(f"router: expected a mapping, got {type(data).__name__}")
        values = _fields(cls, data, "router.", nested=("providers", "reasoning_models", "batch"))
        providers = data.get("providers", [])
        if not isinstance(providers, list):
            raise ValueError("router.providers: expected a list")
        values["providers"] = tuple(_provider(item, f"router.providers[{i}].") for i, item in enumerate(providers))
        values["reasoning_models"] = tuple(_strings(data.get("reasoning_models", []), "router.reasoning_models"))
        if "batch" in data:
            if not isinstance(data["batch"], dict):
                raise ValueError("router.batch: expected a mapping")
            values["batch"] = _build(BatchConfig, _fields(BatchConfig, data["batch"], "router.batch."), "router.batch.")
        return _build(cls, values, "router.")


def _provider(data: Any, prefix: str) -> ProviderConfig:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.')}: expected a mapping")
    values = _fields(ProviderConfig, data, prefix, nested=("models", "outages", "image_models"))
    values["models"] = tuple(_strings(data.get("models", []), f"{prefix}models"))
    values["image_models"] = _image_models(data.get("image_models", []), f"{prefix}image_models")
    outages = data.get("outages", [])
    if not isinstance(outages, list):
        raise ValueError(f"{prefix}outages: expected a list")
    built = []
    for i, item in enumerate(outages):
        if not isinstance(item, dict):
            raise ValueError(f"{prefix}outages[{i}]: expected a mapping")
        built.append(_build(Outage, _fields(Outage, item, f"{prefix}outages[{i}]."), f"{prefix}outages[{i}]."))
    values["outages"] = tuple(built)
    return _build(ProviderConfig, values, prefix)


def _image_models(value: Any, key: str) -> tuple[tuple[str, str], ...]:
    """``{HF_ID: PROVIDER_ID}``, or a list of HF ids served under the same id."""
    if isinstance(value, dict):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError(f"{key}: expected a mapping of HF model ids to the provider's ids")
        return tuple(value.items())
    return tuple((model, model) for model in _strings(value, key))


def _strings(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: expected a list of strings")
    return value


def _fields(cls: type, data: dict[str, Any], prefix: str, nested: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check ``data``'s keys and scalar types against ``cls``; the ``nested`` fields are left to the caller."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ValueError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")
        if key not in nested:
            out[key] = checked_value(f"{prefix}{key}", hints[key], value)
    return out


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    try:
        return cls(**values)
    except ValueError as error:
        raise ValueError(f"{prefix}{error}") from None
