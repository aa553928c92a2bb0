"""The ``endpoint`` section: one target or a list of them (url, local, name, serverless), their limits,
mode and batch options, labels, and the rules on where the Hugging Face token may be sent."""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from batchrun.spec._model import (
    ENDPOINT_KINDS,
    LIFECYCLE_KEYS,
    ON_FINISH,
    BatchSpec,
    EndpointSpec,
    LimitsSpec,
    PriceSpec,
    ScaleSpec,
)
from batchrun.spec._read import _REQUIRED, _STRING, _describe, _KeyReader, _no_userinfo, _suggest
from batchrun.spec._shape import spec_keys

_ENDPOINT_KEYS = spec_keys(EndpointSpec)
_SCALE_KEYS = spec_keys(ScaleSpec)
_PRICE_KEYS = spec_keys(PriceSpec)
# The keys of a serverless target (the router, a url's API): refused for the other kinds.
_PER_TOKEN_KEYS = ("model", "router_url", "api_key_env", "price", "mode", "batch")
_BATCH_KEYS = spec_keys(BatchSpec)
_LIMITS_KEYS = spec_keys(LimitsSpec)


def _default_label(kind: str, url: str | None, local: Any, name: str | None, index: int,
                   provider: str | None = None) -> str:
    """How an endpoint of the list form is named when it has no ``label``: its name, provider, host or place."""
    if kind == "name" and name:
        return name
    if kind == "provider" and provider:
        return provider
    if kind == "url" and url:
        import yarl

        host = yarl.URL(url)
        return f"{host.host}:{host.port}" if host.port else str(host.host)
    if isinstance(local, Mapping) and local.get("name"):
        return str(local["name"])
    return f"endpoint-{index}"


def _url_label_forms(url: str) -> list[str]:
    """A url's labels, shortest first: host:port, then with its path, its query, its scheme."""
    import yarl

    u = yarl.URL(url)
    host = f"{u.host}:{u.port}" if u.port else str(u.host)
    path = u.raw_path.rstrip("/")
    query = f"?{u.raw_query_string}" if u.raw_query_string else ""
    return [host, host + path, host + path + query, f"{u.scheme}://{host}{path}{query}"]


def _distinct_url_labels(endpoints: list[EndpointSpec], *, given: list[bool]) -> list[EndpointSpec]:
    """Urls on one host and port get default labels that tell them apart: each the shortest form of its
    url (host:port, then with the path...) that no other endpoint's label shares. Labels the spec gave
    are kept as they are."""
    forms = [_url_label_forms(e.url) if e.url is not None and not given[i] else None
             for i, e in enumerate(endpoints)]
    level = [0] * len(endpoints)

    def label(i: int) -> str | None:
        options = forms[i]
        return endpoints[i].label if options is None else options[level[i]]

    changed = True
    while changed:
        changed = False
        labels = [label(i) for i in range(len(endpoints))]
        for i, options in enumerate(forms):
            if options is not None and level[i] + 1 < len(options) and labels.count(labels[i]) > 1:
                level[i] += 1
                changed = True
    return [e if forms[i] is None else dataclasses.replace(e, label=label(i)) for i, e in enumerate(endpoints)]


class _EndpointParser(_KeyReader):
    """The endpoint section of a job, and the token policy every url the token may reach is held to."""

    def endpoint_list(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """``endpoint:`` as one mapping (one endpoint, as always) or a list (several, multi-endpoint).

        With the list form, ``endpoint_defaults`` gives keys every item gets unless it sets its own, and
        ``mixed_models`` allows endpoints serving different models.
        """
        data = job["endpoint"]
        mixed = job.get("mixed_models", False)
        if not isinstance(mixed, bool):
            raise self.error("mixed_models", f"expected true or false, got {_describe(mixed)}")
        defaults = job.get("endpoint_defaults")
        if not isinstance(data, list):
            for key in ("endpoint_defaults", "mixed_models"):
                if key in job:
                    raise self.error(key, "only applies when endpoint is a list of endpoints")
            return {"endpoint": self.endpoint(data)}
        if not data:
            raise self.error("endpoint", "expected at least one endpoint in the list")
        if defaults is not None:
            self.section(defaults, "endpoint_defaults", LIFECYCLE_KEYS)
        endpoints = []
        for index, item in enumerate(data):
            where = f"endpoint[{index}]"
            item = self.section(item, where, _ENDPOINT_KEYS)
            if defaults and "url" not in item and "provider" not in item:
                item = {**defaults, **item}
            endpoints.append(self.endpoint(item, where=where, index=index))
        endpoints = _distinct_url_labels(endpoints, given=["label" in item for item in data])
        labels = [e.label for e in endpoints]
        for index, label in enumerate(labels):
            if label in labels[:index]:
                raise self.error(f"endpoint[{index}].label", f"{label!r} names two endpoints; give each its own label")
        return {"endpoint": endpoints[0], "endpoints": tuple(endpoints), "mixed_models": mixed,
                "endpoint_defaults": dict(defaults) if defaults else None}

    def endpoint(self, data: Any, *, where: str = "endpoint", index: int | None = None) -> EndpointSpec:
        data = self.section(data, where, _ENDPOINT_KEYS)
        kind = self.exactly_one(data, where, ENDPOINT_KINDS)
        prefix = where + "."
        label = self.key(EndpointSpec, data, "label", prefix=prefix)
        serverless = self.serverless(data, kind, prefix)
        if kind in ("local", "name") and data.get("limits") is not None:
            raise self.error(f"{prefix}limits", "only applies to an endpoint given by url (or a serverless target): a "
                             "Dedicated endpoint's capacity is found by the adaptive concurrency limit")
        target = self.target(data, kind, prefix)
        api_url = self.api_url(data, prefix)
        send_token = self.key(EndpointSpec, data, "send_token", prefix=prefix)
        if target["url"] is not None:  # an API key is held to the rules of a token sent (https beyond loopback)
            self.token_url(target["url"], f"{prefix}url", send_token or bool(serverless.get("api_key_env")),
                           f"{prefix}send_token")
        if api_url is not None:  # huggingface_hub sends the token to every control-plane call
            self.token_url(api_url, f"{prefix}api_url", send_token, f"{prefix}send_token", always=True)
        on_finish = data.get("on_finish")
        if on_finish is not None and on_finish not in ON_FINISH:
            hint = _suggest(on_finish, ON_FINISH) if isinstance(on_finish, str) else ""
            raise self.error(f"{prefix}on_finish", f"expected one of {', '.join(ON_FINISH)}, got {on_finish!r}{hint}")
        price = self.key(EndpointSpec, data, "price_per_replica_hour", prefix=prefix)
        return EndpointSpec(
            **target,
            api_url=api_url,
            scale=self.scale(data.get("scale")),
            ready_timeout=self.key(EndpointSpec, data, "ready_timeout", prefix=prefix),
            on_finish=on_finish,
            idle_backstop=self.key(EndpointSpec, data, "idle_backstop", prefix=prefix),
            price_per_replica_hour=price,
            send_token=send_token,
            label=label if label is not None or index is None else _default_label(
                kind, target["url"], target["local"], target["name"], index, serverless.get("provider")),
            **serverless,
            limits=self.limits(data.get("limits"), prefix + "limits"),
        )

    # The ways to name an endpoint and the keys each allows are read together.
    def target(self, data: Mapping[str, Any], kind: str, prefix: str) -> dict[str, Any]:
        """What the endpoint is: its ``url``, ``local`` settings, or ``name`` and ``namespace``."""
        url = local = name = namespace = None
        if kind == "provider":
            for key in (*LIFECYCLE_KEYS, "send_token"):
                if key in data:
                    raise self.error(f"{prefix}{key}", "only applies to an endpoint given by name or local; the "
                                     "Inference Providers router has no lifecycle and always gets the HF token")
        elif kind == "url":
            url = self.read(data, "url", _STRING, prefix=prefix)
            if not re.match(r"^https?://[^/\s]+", url):
                raise self.error(f"{prefix}url", f"expected an http:// or https:// URL, got {_no_userinfo(url)!r}")
            for key in LIFECYCLE_KEYS:
                if key in data:
                    raise self.error(
                        f"{prefix}{key}",
                        "only applies to an endpoint given by name or local; "
                        "batchrun does not manage the lifecycle of a url",
                    )
        elif kind == "local":
            local = data["local"]
            if local is None:
                local = {}
            if not isinstance(local, Mapping):
                raise self.error(
                    f"{prefix}local", f"expected a mapping of emulator settings (or {{}}), got {_describe(local)}"
                )
            local = dict(local)
        else:
            name = self.key(EndpointSpec, data, "name", prefix=prefix, default=_REQUIRED)
            if "namespace" not in data:
                raise self.error(
                    f"{prefix}namespace",
                    "is required with endpoint.name (the user or organization that owns the endpoint)",
                )
        if "namespace" in data:
            if kind != "name":
                raise self.error(f"{prefix}namespace", "only applies together with endpoint.name")
            namespace = self.key(EndpointSpec, data, "namespace", prefix=prefix, default=_REQUIRED)
        return {"url": url, "local": local, "name": name, "namespace": namespace}

    def api_url(self, data: Mapping[str, Any], prefix: str) -> str | None:
        """``api_url``: the control plane's base URL (ending in /v2), for an endpoint batchrun manages."""
        api_url: str | None = self.read(data, "api_url", _STRING, prefix=prefix, default=None)
        if api_url is not None:
            api_url = api_url.rstrip("/")
            if not re.match(r"^https?://", api_url) or not api_url.endswith("/v2"):
                raise self.error(
                    f"{prefix}api_url",
                    f"expected the control plane's base URL ending in /v2, got {_no_userinfo(api_url)!r}",
                )
        return api_url

    def serverless(self, data: Mapping[str, Any], kind: str, prefix: str) -> dict[str, Any]:
        """The keys of a serverless target, billed per token: ``provider`` + ``model`` (the router), or
        ``url`` + ``model`` (an OpenAI-compatible API, its key in the environment variable ``api_key_env``).

        The key is looked up now, so that a missing variable is found before anything runs; its value is
        never kept in the spec."""
        if kind not in ("url", "provider"):
            for key in _PER_TOKEN_KEYS:
                if key in data:
                    raise self.error(f"{prefix}{key}", "only applies with endpoint.provider or endpoint.url")
            return {}
        if kind == "url" and "model" not in data:
            for key in ("router_url", "api_key_env", "price", "mode", "batch"):
                if key in data:
                    raise self.error(f"{prefix}{key}", "only applies with endpoint.model (an OpenAI-compatible API "
                                     "billed per token) or endpoint.provider")
            return {}
        values: dict[str, Any] = {"model": self.key(EndpointSpec, data, "model", prefix=prefix, default=_REQUIRED)}
        if kind == "provider":
            values["provider"] = self.key(EndpointSpec, data, "provider", prefix=prefix)
            if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", values["provider"]):
                raise self.error(f"{prefix}provider", f"expected a provider name (or auto), got {values['provider']!r}")
            if ":" in values["model"] or not re.fullmatch(r"[\w.-]+/[\w.-]+", values["model"]):
                raise self.error(f"{prefix}model", f"expected a model id ORG/NAME (the provider goes in "
                                 f"endpoint.provider), got {values['model']!r}")
            if "api_key_env" in data:
                raise self.error(f"{prefix}api_key_env", "only applies with endpoint.url: the router takes the "
                                 "Hugging Face token (HF_TOKEN, or `hf auth login`)")
            router_url = self.read(data, "router_url", _STRING, prefix=prefix, default=None)
            if router_url is not None and router_url != "local":
                router_url = router_url.rstrip("/")
                if not re.match(r"^https?://[^/\s]+", router_url) or not router_url.endswith("/v1"):
                    raise self.error(f"{prefix}router_url", "expected the router's base URL ending in /v1, or "
                                     f"local, got {_no_userinfo(router_url)!r}")
                self.token_url(router_url, f"{prefix}router_url", False, f"{prefix}send_token", always=True)
            values["router_url"] = router_url
        else:
            if "router_url" in data:
                raise self.error(f"{prefix}router_url", "only applies with endpoint.provider")
            variable = self.read(data, "api_key_env", _STRING, prefix=prefix, default=None)
            if variable is not None:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variable):
                    raise self.error(f"{prefix}api_key_env", f"expected an environment variable name, got {variable!r}")
                if not os.environ.get(variable):
                    raise self.error(f"{prefix}api_key_env", f"the environment variable {variable} is not set: "
                                     "export the API key in it (the key is never written in the spec)")
                if "send_token" in data:
                    raise self.error(f"{prefix}send_token", "does not apply with api_key_env: the API key goes to "
                                     "endpoint.url, and the Hugging Face token does not")
            values["api_key_env"] = variable
        if data.get("price") is not None:
            price = self.section(data["price"], f"{prefix}price", _PRICE_KEYS)
            values["price"] = PriceSpec(**{k: self.key(PriceSpec, price, k, prefix=f"{prefix}price.")
                                           for k in _PRICE_KEYS})
            given = values["price"]
            if (given.input_per_mtok is None) != (given.output_per_mtok is None) or given == PriceSpec():
                raise self.error(f"{prefix}price", "expected {input_per_mtok, output_per_mtok} (USD per 1M tokens, "
                                 "both) or {per_image, per_megapixel} (USD per image and per megapixel, either or "
                                 "both, for text-to-image)")
        values.update(self.mode(data, prefix))
        return values

    def limits(self, data: Any, where: str) -> LimitsSpec | None:
        if data is None:
            return None
        data = self.section(data, where, _LIMITS_KEYS)
        prefix = where + "."
        return LimitsSpec(rpm=self.key(LimitsSpec, data, "rpm", prefix=prefix),
                          tpm=self.key(LimitsSpec, data, "tpm", prefix=prefix))

    def mode(self, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """``mode`` and its ``batch`` section: the batch API's limits and polling (batchrun/batches/)."""
        mode = self.key(EndpointSpec, data, "mode", prefix=prefix)
        if data.get("batch") is None:
            return {"mode": mode}
        if mode == "online":  # flex takes its discount from it
            raise self.error(f"{prefix}batch", "only applies with mode: batch (or flex, for its discount)")
        batch = self.section(data["batch"], f"{prefix}batch", _BATCH_KEYS)
        return {"mode": mode, "batch": BatchSpec(**{k: self.key(BatchSpec, batch, k, prefix=f"{prefix}batch.")
                                                   for k in _BATCH_KEYS})}

    def scale(self, data: Any) -> ScaleSpec | None:
        if data is None:
            return None
        data = self.section(data, "endpoint.scale", _SCALE_KEYS)
        prefix = "endpoint.scale."
        for key in _SCALE_KEYS:
            if key not in data:
                raise self.error(prefix + key, "is required")
        low = self.key(ScaleSpec, data, "min_replica", prefix=prefix)
        high = self.key(ScaleSpec, data, "max_replica", prefix=prefix)
        if low > high:
            raise self.error("endpoint.scale.min_replica", f"expected at most max_replica ({high}), got {low}")
        return ScaleSpec(min_replica=low, max_replica=high)

    def token_url(self, url: str, key: str, send_token: bool, opt_in_key: str, *, always: bool = False) -> None:
        """Refuse a url with credentials in it, and one the HF token must not reach: plain http beyond
        loopback when it would be sent (``send_token``, or ``always`` for huggingface_hub's calls), a
        host other than Hugging Face's unless ``send_token`` (``always``; a plain url then goes without it)."""
        from batchrun.transport import token_problem

        if urllib.parse.urlsplit(url).username is not None or "@" in urllib.parse.urlsplit(url).netloc:
            raise self.error(key, (
                f"{_no_userinfo(url)!r} has credentials in it (user:password@), which would be stored in job.json, "
                "summary.json and a published dataset card; remove them. batchrun sends the Hugging Face token "
                "(HF_TOKEN, or `hf auth login`) as a Bearer token: to give it to a host other than Hugging Face's, "
                f"set {opt_in_key}: true (https only)"))
        problem = token_problem(url, send_token=send_token)
        if problem is None:
            return
        if url.lower().startswith("http://") and (send_token or always):
            raise self.error(key, f"{problem}; use https (the token never goes over plain http beyond loopback)")
        if always:
            raise self.error(key, f"{problem} ({opt_in_key}: true), and huggingface_hub sends it on every call")
