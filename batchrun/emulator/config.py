"""Configuration of the local Inference Endpoint emulator.

Frozen, keyword-only dataclasses. ``EndpointConfig.from_dict`` is the edge where a user's YAML or a
job spec's ``endpoint: {local: {...}}`` dict comes in: it rejects unknown keys and wrong types with a
``ValueError`` that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batchrun.emulator.config_values import checked_value
from batchrun.emulator.router_config import RouterConfig
from batchrun.errors import EmulatorError

# Tasks served by Text Embeddings Inference (batchrun.emulator.tei): embedding, reranker and classifier models.
TEI_TASKS = ("feature-extraction", "sentence-similarity", "text-ranking", "text-classification")
TASKS = ("text-generation", "text-to-image", "image-text-to-text", *TEI_TASKS)
INITIAL_STATES = ("paused", "running", "scaledToZero", "failed")
EPISODE_KINDS = ("outage_503", "lose_replica", "fail_endpoint")
DEFAULT_TOKEN = "hf_emulator_local_token"
EMULATOR_CONFIG_KEYS = ("token", "host", "control_port", "endpoints", "hub_datasets", "router")
# Top-level keys of a batchrun job spec: a file holding some of these is a job, not an emulator config.
_JOB_SPEC_KEYS = frozenset({"input", "prompt", "task", "output", "endpoint", "parameters", "concurrency"})


class EmulatorConfigError(EmulatorError, ValueError):
    """An emulator config (file, dict or setting) that cannot be used; the message names the file and key."""


def check_loopback_host(host: str, *, key: str = "host") -> None:
    """Refuse any address but a loopback one (127.0.0.0/8, ::1, localhost): the emulator accepts a fixed token."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise EmulatorConfigError(
            f"{key} {host}: the emulator only binds loopback addresses (127.0.0.0/8, ::1, localhost), because it "
            "accepts a fixed token and is meant for tests and demos")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def is_commit_sha(value: object) -> bool:
    """Whether ``value`` is a full git commit sha (40 lowercase hex digits), as the Hub names a revision."""
    return isinstance(value, str) and _COMMIT_SHA.fullmatch(value) is not None


def derived_revision(model_id: str) -> str:
    """The revision an endpoint serves when none is configured: a stable 40-hex sha of the model id."""
    return hashlib.sha1(f"batchrun-emulator/{model_id}".encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Faults:
    """Per-request fault rates (each a probability in [0, 1]), decided reproducibly from ``seed``.

    A request's fate is a function of (seed, request body, how many times that body was seen
    before), so a rerun of the same requests meets the same faults whatever the concurrency.
    """

    # HTTP errors answered instead of the real response.
    rate_429: float = 0.0  # 429 `Model is overloaded` with a Retry-After header
    rate_429_no_retry_after: float = 0.0  # 429 as TGI sends it: no Retry-After
    rate_500: float = 0.0
    rate_502: float = 0.0
    rate_503: float = 0.0
    rate_504: float = 0.0
    # Transport-level faults.
    rate_reset: float = 0.0  # the TCP connection is reset (RST) after the request was read
    rate_hang: float = 0.0  # no answer for hang_s seconds, then the connection is closed
    # 200 answers that must not be trusted.
    rate_error_body: float = 0.0  # 200 whose JSON body is a TGI error object
    rate_truncated: float = 0.0  # 200 whose body is cut in half (Content-Length matches the cut)
    # A request with a json grammar (or response_format) is answered with broken JSON, or JSON that
    # breaks the schema; other requests are answered as usual.
    rate_invalid_json: float = 0.0
    retry_after_s: float = 1.0  # the value sent in Retry-After for rate_429
    hang_s: float = 300.0
    seed: int = 0

    def total(self) -> float:
        """The probability that a request meets any fault."""
        return sum(getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("rate_"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("rate_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"faults.{f.name}: must be between 0 and 1, got {value!r}")
        if self.total() > 1.0:
            raise ValueError(f"faults: the rates add up to {self.total():.3f}, more than 1")
        if not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"faults.seed: must fit in 64 bits, got {self.seed}")


@dataclass(frozen=True, kw_only=True)
class Episode:
    """A scripted incident.

    ``kind`` is ``outage_503`` (every data-plane request gets 503 for ``seconds``), ``lose_replica``
    (one ready replica disappears and restarts, taking ``replica_start_s``) or ``fail_endpoint``
    (the endpoint goes to ``failed``). It starts ``at_s`` seconds after the endpoint's first
    data-plane request, or when the ``after_requests``-th data-plane request arrives.
    """

    kind: str
    at_s: float | None = None
    after_requests: int | None = None
    seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in EPISODE_KINDS:
            raise ValueError(f"episodes.kind: expected one of {', '.join(EPISODE_KINDS)}, got {self.kind!r}")
        if (self.at_s is None) == (self.after_requests is None):
            raise ValueError("episodes: give exactly one of at_s or after_requests")


@dataclass(frozen=True, kw_only=True)
class EndpointConfig:
    """One emulated Inference Endpoint: identity, scaling, timing, limits and faults."""

    # Identity, as the control plane shows it.
    name: str
    namespace: str = "batchrun-local"
    task: str = "text-generation"
    model_id: str = "google/gemma-1.1-2b-it"
    # The commit served (GET /info's model_sha, the control plane's model.revision); None: derived_revision(model_id).
    revision: str | None = None
    framework: str = "pytorch"
    type: str = "protected"  # protected endpoints check the bearer token on the data plane too
    vendor: str = "aws"
    region: str = "us-east-1"
    accelerator: str = "gpu"
    instance_type: str = "nvidia-a10g"
    instance_size: str = "x1"
    # Where the data plane listens (loopback); 0 picks a free port. Fixed ports suit `batchrun emulate`.
    port: int = 0
    # Scaling.
    initial_state: str = "paused"
    min_replica: int = 1
    max_replica: int = 1
    scale_to_zero_timeout: float = 15.0  # minutes of idleness before min_replica=0 endpoints scale to zero
    # Timing of the lifecycle, seconds.
    pending_s: float = 0.5
    initializing_s: float = 2.0  # until the first replica is ready
    replica_start_s: float = 1.0  # each further replica, one after the other
    fail_on_deploy: bool = False
    # TGI limits.
    max_concurrent_requests: int = 128
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    # Latency of the data plane, seconds.
    latency_base_s: float = 0.0
    latency_per_token_s: float = 0.0
    latency_jitter_s: float = 0.0
    image_latency_s: float = 0.0
    # Text-to-image.
    image_default_size: int = 1024
    image_max_size: int = 2048
    image_reject_non_square: bool = True
    # Text Embeddings Inference (the TEI_TASKS). max_concurrent_requests and latency_* above apply too;
    # TEI counts its permits per input, not per request.
    tei_version: str = "1.9.3"  # picks the version-dependent behaviour (413 or 422, 429 or a wait, ...)
    embedding_dim: int = 384
    pooling: str = "cls"  # shown in /info
    id2label: tuple[str, ...] = ()  # labels by id (YAML: a list or an {"0": ...} mapping); () = the task's default
    # Sentence Transformers prompts (prompt_name -> text prepended); YAML: a mapping.
    prompts: tuple[tuple[str, str], ...] = (("query", "query: "), ("passage", "passage: "))
    max_input_length: int = 512  # tokens, the two special tokens included
    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_client_batch_size: int = 32
    auto_truncate: bool | None = None  # None: the version's default (false before 1.9.0, true from it)
    tokenization_workers: int = 4
    # Determinism and faults.
    seed: int = 0
    # Mixed into every fault draw besides faults.seed: the same value replays the same faults, another
    # value draws others. `batchrun run` sets it to a run counter so a rerun meets fresh faults.
    fault_seed: int = 0
    faults: Faults = field(default_factory=Faults)
    episodes: tuple[Episode, ...] = ()

    @property
    def model_sha(self) -> str:
        """The 40-hex revision this endpoint serves: ``revision`` if set, else one derived from ``model_id``."""
        return self.revision if self.revision is not None else derived_revision(self.model_id)

    def __post_init__(self) -> None:
        if self.revision is not None and not is_commit_sha(self.revision):
            raise ValueError(f"revision: expected a 40-hex commit sha (or no revision), got {self.revision!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        if self.initial_state not in INITIAL_STATES:
            raise ValueError(f"initial_state: expected one of {', '.join(INITIAL_STATES)}, got {self.initial_state!r}")
        if self.min_replica < 0 or self.max_replica < max(1, self.min_replica):
            raise ValueError(
                f"min_replica/max_replica: need 0 <= min_replica <= max_replica and max_replica >= 1, "
                f"got {self.min_replica}/{self.max_replica}"
            )
        if not -(2**63) <= self.fault_seed < 2**63:
            raise ValueError(f"fault_seed: must fit in 64 bits, got {self.fault_seed}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535 (0 picks a free port), got {self.port}")
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests: must be at least 1")
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("max_input_tokens: must be less than max_total_tokens")
        for name in ("pending_s", "initializing_s", "replica_start_s", "latency_base_s", "latency_per_token_s",
                     "latency_jitter_s", "image_latency_s", "scale_to_zero_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must not be negative")
        _check_tei(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EndpointConfig:
        """Build from a plain dict (YAML, a job spec); unknown keys and wrong types raise ValueError naming the key."""
        if not isinstance(data, dict):
            raise ValueError(f"endpoint: expected a mapping, got {type(data).__name__}")
        values = _typed_fields(cls, data, prefix="")
        if "faults" in data:
            if not isinstance(data["faults"], dict):
                raise ValueError("faults: expected a mapping of rates")
            values["faults"] = Faults(**_typed_fields(Faults, data["faults"], prefix="faults."))
        if "episodes" in data:
            if not isinstance(data["episodes"], list):
                raise ValueError("episodes: expected a list")
            episodes = []
            for i, item in enumerate(data["episodes"]):
                if not isinstance(item, dict):
                    raise ValueError(f"episodes[{i}]: expected a mapping")
                episodes.append(Episode(**_typed_fields(Episode, item, prefix=f"episodes[{i}].")))
            values["episodes"] = tuple(episodes)
        values.update(_tei_mappings(data))
        if "name" not in values:
            raise ValueError("name: required")
        return cls(**values)


def _typed_fields(cls: type, data: dict[str, Any], *, prefix: str) -> dict[str, Any]:
    """Check ``data``'s keys and scalar types against the dataclass ``cls``; nested fields are left out."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ValueError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")
        if key in ("faults", "episodes", *_TEI_MAPPINGS) and cls is EndpointConfig:
            continue
        out[key] = checked_value(f"{prefix}{key}", hints[key], value)
    return out


# ----- Text Embeddings Inference settings

_TEI_MAPPINGS = ("id2label", "prompts")
_TEI_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def tei_version_tuple(version: str) -> tuple[int, int, int]:
    """``"1.9.3"`` -> ``(1, 9, 3)``; a ValueError naming ``tei_version`` for anything else."""
    match = _TEI_VERSION.fullmatch(version)
    if match is None:
        raise ValueError(f"tei_version: expected a TEI release such as 1.9.3 or 1.8.3, got {version!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def tei_auto_truncate(config: EndpointConfig) -> bool:
    """Whether inputs are truncated when a request does not say: the setting, else the version's default."""
    if config.auto_truncate is not None:
        return config.auto_truncate
    return tei_version_tuple(config.tei_version) >= (1, 9, 0)  # `--auto-truncate` defaults to true from 1.9.0


def _check_tei(config: EndpointConfig) -> None:
    tei_version_tuple(config.tei_version)
    for name in ("embedding_dim", "max_input_length", "max_batch_tokens", "max_client_batch_size",
                 "tokenization_workers"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}: must be at least 1")
    if config.max_batch_requests is not None and config.max_batch_requests < 1:
        raise ValueError("max_batch_requests: must be at least 1 (or null)")
    if config.task == "text-ranking" and len(config.id2label) > 1:
        raise ValueError(f"id2label: a text-ranking (reranker) model has one label, got {len(config.id2label)}")
    if config.max_input_length > config.max_batch_tokens and not tei_auto_truncate(config):
        # TEI refuses to start in this case (router/src/lib.rs); with auto-truncate it lowers the limit.
        raise ValueError(f"max_input_length: {config.max_input_length} exceeds max_batch_tokens "
                         f"{config.max_batch_tokens}; raise max_batch_tokens or set auto_truncate: true")


def _tei_mappings(data: dict[str, Any]) -> dict[str, Any]:
    """``id2label`` (a list, or a mapping from "0".."n-1") and ``prompts`` (name -> text) as tuples."""
    out: dict[str, Any] = {}
    if "id2label" in data:
        labels = data["id2label"]
        if isinstance(labels, dict):
            keys = [str(key) for key in labels]
            if sorted(keys, key=lambda k: int(k) if k.isdigit() else -1) != [str(i) for i in range(len(keys))]:
                raise ValueError(f"id2label: the keys must be the ids 0..{len(keys) - 1}, got {keys}")
            labels = [labels[key] if key in labels else labels[int(key)] for key in sorted(keys, key=int)]
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise ValueError("id2label: expected a list of labels or a mapping of ids to labels")
        out["id2label"] = tuple(labels)
    if "prompts" in data:
        prompts = data["prompts"]
        if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in prompts.items()):
            raise ValueError("prompts: expected a mapping of prompt names to the text they prepend")
        out["prompts"] = tuple(prompts.items())
    return out


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    """A whole emulator: the token it accepts (None: no auth), its endpoints, where it listens."""

    token: str | None = DEFAULT_TOKEN
    # No endpoints given: the demo set (what `batchrun emulate` serves without a config file).
    endpoints: list[EndpointConfig] = field(default_factory=lambda: default_endpoints())
    host: str = "127.0.0.1"
    control_port: int = 0
    # Dataset repos the emulated Hub holds from the start: repo id -> a local folder (or one file) to commit.
    hub_datasets: dict[str, str] = field(default_factory=dict)
    # The Inference Providers router and its batch API on their own loopback port; None: not served.
    router: RouterConfig | None = None

    def __post_init__(self) -> None:
        seen: set[tuple[str, str]] = set()
        for endpoint in self.endpoints:
            key = (endpoint.namespace, endpoint.name)
            if key in seen:
                raise EmulatorConfigError(f"endpoints: {endpoint.namespace}/{endpoint.name} is defined twice")
            seen.add(key)
        # The emulator is a loopback tool: it never listens on a reachable interface.
        check_loopback_host(self.host)
        if not 0 <= self.control_port <= 65535:
            raise EmulatorConfigError(f"control_port: expected 0..65535, got {self.control_port}")

    def __repr__(self) -> str:
        # Never show the token.
        names = [f"{e.namespace}/{e.name}" for e in self.endpoints]
        return f"EmulatorConfig(token={'***' if self.token else None}, endpoints={names}, host={self.host!r})"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmulatorConfig:
        """Build from a plain dict: ``{token, host, control_port, endpoints: [ {...}, ... ]}``."""
        expected = f"an emulator config has the keys {', '.join(EMULATOR_CONFIG_KEYS)}; see docs/emulator.md"
        if not isinstance(data, dict):
            raise EmulatorConfigError(f"not an emulator config: expected a mapping, got {type(data).__name__}; "
                                      f"{expected}")
        unknown = [key for key in data if key not in EMULATOR_CONFIG_KEYS]
        if unknown:
            if _JOB_SPEC_KEYS & set(data):
                raise EmulatorConfigError("this is a job spec, not an emulator config: run it with `batchrun run FILE`"
                                          f" ({expected})")
            names = ", ".join(str(key) for key in unknown)
            raise EmulatorConfigError(f"not an emulator config: unknown key{'s' if len(unknown) > 1 else ''} {names} "
                                      f"({expected})")
        endpoints_raw = data.get("endpoints", [])
        if not isinstance(endpoints_raw, list):
            raise EmulatorConfigError("endpoints: expected a list")
        endpoints = []
        for i, item in enumerate(endpoints_raw):
            try:
                endpoints.append(EndpointConfig.from_dict(item))
            except ValueError as error:
                raise EmulatorConfigError(f"endpoints[{i}].{error}") from None
        token = data.get("token", DEFAULT_TOKEN)
        if token is not None and not isinstance(token, str):
            raise EmulatorConfigError("token: expected a string or null")
        host = data.get("host", "127.0.0.1")
        if not isinstance(host, str):
            raise EmulatorConfigError("host: expected a string")
        port = data.get("control_port", 0)
        if not isinstance(port, int) or isinstance(port, bool):
            raise EmulatorConfigError("control_port: expected int")
        hub_datasets = data.get("hub_datasets") or {}
        if not isinstance(hub_datasets, dict) or not all(
            isinstance(k, str) and k.count("/") == 1 and isinstance(v, str) for k, v in hub_datasets.items()
        ):
            raise EmulatorConfigError("hub_datasets: expected a mapping of ORG/NAME to a local folder or file")
        router = None
        if data.get("router") is not None:
            try:
                router = RouterConfig.from_dict(data["router"])
            except ValueError as error:
                raise EmulatorConfigError(str(error)) from None
        return cls(token=token, endpoints=endpoints or default_endpoints(), host=host, control_port=port,
                   hub_datasets=dict(hub_datasets), router=router)


def default_endpoints() -> list[EndpointConfig]:
    """The demo set: one endpoint per task, running, with small realistic latencies."""
    common: dict[str, Any] = {"namespace": "batchrun-local", "initial_state": "running", "min_replica": 1,
                              "max_replica": 2}
    return [
        EndpointConfig(name="gemma-local", task="text-generation", model_id="google/gemma-1.1-2b-it",
                       latency_base_s=0.05, latency_per_token_s=0.002, **common),
        EndpointConfig(name="sdxl-local", task="text-to-image", model_id="stabilityai/stable-diffusion-xl-base-1.0",
                       image_latency_s=0.2, image_default_size=512, **common),
        EndpointConfig(name="idefics2-local", task="image-text-to-text", model_id="HuggingFaceM4/idefics2-8b",
                       latency_base_s=0.08, latency_per_token_s=0.003, **common),
    ]


def load_emulator_config(path: str | Path) -> EmulatorConfig:
    """Read an emulator config from a YAML file; an EmulatorConfigError (a ValueError) names the file and the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise EmulatorConfigError(f"{path}: cannot read the emulator config: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise EmulatorConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    try:
        return EmulatorConfig.from_dict(data)
    except ValueError as error:
        message = str(error).replace("`batchrun run FILE`", f"`batchrun run {path}`")
        raise EmulatorConfigError(f"{path}: {message}") from None
