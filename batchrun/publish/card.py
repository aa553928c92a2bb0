"""The dataset card (README.md): its YAML header, batchrun's marked sections, and the user's own words.

batchrun owns, per config it pushes: that config's entry in ``configs`` and in ``dataset_info``, its
entry under the ``batchrun`` key (the job and its fingerprint, which is how a later push knows whose
data a config holds), and the text between ``<!-- batchrun:begin CONFIG -->`` and
``<!-- batchrun:end CONFIG -->``. Everything else in the card is the user's and is kept as it is:
other YAML keys (their values; the header is written back as YAML, so comments in it are not kept),
other configs, and every line of prose outside the markers.

A marker counts only as a line of its own outside a code fence, so a prompt template or spec shown
in the section (always fenced) cannot end it early; text that came from the model (the sample rows)
is HTML-escaped, so an answer holding ``</table>`` or an unclosed ``<!--`` shows as text and hides
nothing after it.
"""

from __future__ import annotations

import html
import json
import re
import shlex
from typing import Any

import yaml

from batchrun.errors import redact
from batchrun.publish.card_facts import JobFacts
from batchrun.publish.layout import Target
from batchrun.publish.names import failed_config_name

__all__ = ["Card", "foreign_problem", "render_card"]

YAML_KEY = "batchrun"
_USER_NOTE = "<!-- Text outside the batchrun sections is yours: batchrun keeps it on every push. -->"


class Card:
    """A README split into its YAML header (a dict) and its markdown body."""

    def __init__(self, meta: dict[str, Any], body: str) -> None:
        self.meta = meta
        self.body = body

    @classmethod
    def parse(cls, text: str | None) -> Card:
        """Read a README; one without a (valid) YAML header keeps its whole text as the body."""
        if not text:
            return cls({}, "")
        match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, re.DOTALL)
        if match is None:
            return cls({}, text)
        try:
            meta = yaml.safe_load(match.group(1)) or {}
        except yaml.YAMLError:
            return cls({}, text)
        if not isinstance(meta, dict):
            return cls({}, text)
        return cls(meta, text[match.end():])

    def owner(self, config: str) -> dict[str, Any] | None:
        """The job batchrun recorded for ``config`` (``{"job", "fingerprint", ...}``), or None."""
        record = (self.meta.get(YAML_KEY) or {}).get(config) if isinstance(self.meta.get(YAML_KEY), dict) else None
        return record if isinstance(record, dict) else None

    def declares(self, config: str) -> bool:
        """Whether the header's ``configs`` names ``config``."""
        return any(isinstance(c, dict) and c.get("config_name") == config for c in _as_list(self.meta.get("configs")))

    def text(self) -> str:
        header = yaml.safe_dump(self.meta, sort_keys=False, allow_unicode=True, width=1000)
        return f"---\n{header}---\n{self.body}"


def foreign_problem(card: Card, remote_paths: list[str], target: Target, facts: JobFacts) -> str | None:
    """Why pushing ``facts``' job to ``target`` would mix it with another job's data, or None.

    A config belongs to the job whose fingerprint the card records for it. A config that the card
    declares, or that has files in the repo, with no record of batchrun's, holds someone else's data.
    """
    for config in target.configs:
        owner = card.owner(config)
        if owner is not None:
            if owner.get("fingerprint") != facts.fingerprint:
                return (f"{target.repo} already holds another job's data in config {config!r} (job "
                        f"{owner.get('job')!r}, fingerprint {owner.get('fingerprint')}; this output is job "
                        f"{facts.name!r}, fingerprint {facts.fingerprint}). batchrun will not mix two jobs in one "
                        "config: push with --config NAME to add this job as a config of its own, or use another repo")
            continue
        if card.declares(config) or any(p.startswith(f"{config}/") for p in remote_paths):
            return (f"{target.repo} already holds data in config {config!r} that batchrun did not push (no job "
                    "fingerprint in its card): push with --config NAME to add this job beside it, or use another repo")
    return None


def render_card(existing: str | None, facts: JobFacts, target: Target, *, with_thumbnails: bool) -> str:
    """The README after this push: ``existing`` with batchrun's keys and sections rewritten, never the token."""
    card = Card.parse(existing)
    for config, kind in target.configs.items():
        _own_config(card.meta, config, target.split, facts, kind)
    if not card.body.strip():
        card.body = f"\n# {target.repo.split('/')[1]}\n\n{_USER_NOTE}\n"
    card.body = _replace_section(card.body, target.config, _section(facts, target, with_thumbnails=with_thumbnails))
    return redact(card.text())


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):  # a single-config header: one mapping instead of a list
        return [value]
    return []


def _upsert(entries: list[Any], config: str, entry: dict[str, Any]) -> list[Any]:
    out = [e for e in entries if not (isinstance(e, dict) and e.get("config_name", "default") == config)]
    old = next((e for e in entries if isinstance(e, dict) and e.get("config_name", "default") == config), None)
    out.append(entry if old is None else {**old, **entry})
    return out


def _by_split(old: Any, key: str, split: str, value: dict[str, Any]) -> list[Any]:
    """A list of per-split entries with ``split``'s replaced and the others kept."""
    kept = [e for e in _as_list(old) if isinstance(e, dict) and e.get(key) != split]
    return sorted([*kept, value], key=lambda e: str(e.get(key)))


def _own_config(meta: dict[str, Any], config: str, split: str, facts: JobFacts, kind: str) -> None:
    """Write batchrun's YAML for one config: ``configs``, ``dataset_info`` and ``batchrun`` entries."""
    configs = _as_list(meta.get("configs"))
    old = next((c for c in configs if isinstance(c, dict) and c.get("config_name") == config), {})
    files = _by_split(old.get("data_files"), "split", split, {"split": split, "path": f"{config}/{split}-*.parquet"})
    meta["configs"] = _upsert(configs, config, {"config_name": config, "data_files": files})
    rows = facts.ok_rows if kind == "data" else facts.failed_rows
    infos = _as_list(meta.get("dataset_info"))
    old_info = next((i for i in infos if isinstance(i, dict) and i.get("config_name", "default") == config), {})
    splits = _by_split(old_info.get("splits"), "name", split,
                       {"name": split, "num_bytes": facts.num_bytes.get(kind, 0), "num_examples": rows})
    info: dict[str, Any] = {"config_name": config, "features": facts.features.get(kind, []), "splits": splits}
    meta["dataset_info"] = _upsert(infos, config, info)
    records: dict[str, Any] = meta[YAML_KEY] if isinstance(meta.get(YAML_KEY), dict) else {}
    records[config] = {"job": facts.name, "fingerprint": facts.fingerprint, "holds": kind, "batchrun": facts.version}
    meta[YAML_KEY] = records


def _replace_section(body: str, config: str, section: str) -> str:
    begin, end = f"<!-- batchrun:begin {config} -->", f"<!-- batchrun:end {config} -->"
    block = f"{begin}\n{section.strip()}\n{end}"
    lines = body.splitlines(keepends=True)
    markers = _marker_lines(lines, (begin, end))
    start = next((i for i, marker in markers if marker == begin), None)
    stop = next((i for i, marker in markers if marker == end and start is not None and i > start), None)
    if start is not None and stop is not None:
        after = lines[stop][lines[stop].index(end) + len(end):]
        return "".join(lines[:start]) + block + after + "".join(lines[stop + 1:])
    return body.rstrip("\n") + "\n\n" + block + "\n"


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _marker_lines(lines: list[str], markers: tuple[str, ...]) -> list[tuple[int, str]]:
    """The lines that are one of ``markers`` on their own, outside a fenced code block (where a marker
    is only shown, e.g. in a prompt template)."""
    found: list[tuple[int, str]] = []
    fence: str | None = None  # the open fence's run of ` or ~
    for index, line in enumerate(lines):
        opened = _FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence) \
                    and not line.strip().strip(fence[0]):
                fence = None
            continue
        if opened and not (opened.group(1)[0] == "`" and "`" in line.strip()[len(opened.group(1)):]):
            fence = opened.group(1)
            continue
        if line.strip() in markers:
            found.append((index, line.strip()))
    return found


def _fenced(text: str, lang: str = "") -> str:
    """``text`` in a code fence longer than any run of backticks inside it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _code(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return "`" + " ".join(text.split()).replace("`", "'").replace("|", "\\|") + "`"


def _section(facts: JobFacts, target: Target, *, with_thumbnails: bool) -> str:
    # Long on purpose: the card is one document, read top to bottom; split up it would be harder to check.
    spec, summary = facts.spec, facts.summary or {}
    endpoint = summary.get("endpoint") or {}
    details = endpoint.get("details") or {}
    prompt = spec.get("prompt") or {}
    failed_config = failed_config_name(target.config)
    lines = [f"## Config `{target.config}`: how this data was made", ""]
    lines.append(f"Generated by [batchrun](https://pypi.org/project/batchrun/) {facts.version} from job "
                 f"`{facts.name}` (fingerprint `{facts.fingerprint}`).")
    lines += ["", "| | |", "|---|---|"]
    rows = [
        ("Model", _code(facts.model) if facts.model else "not reported by the endpoint"),
        ("Model revision (served)", _code(facts.revision) if facts.revision else "not reported by the endpoint"),
        ("Endpoint", _code(endpoint.get("ref") or _endpoint_ref(spec))),
        ("Hardware", _code(details["instance"]) if details.get("instance") else "not known"),
        ("Container image", _code(details["image"]) if details.get("image") else "not known"),
        ("Task", _code(spec.get("task"))),
        ("Prompt", f"column {_code(prompt['column'])}" if prompt.get("column") else "template (below)"),
        ("Parameters", _code(spec.get("parameters") or {})),
        ("Rows", f"{facts.ok_rows} ok in split `{target.split}`; {facts.failed_rows} failed "
                 + (f"(config `{failed_config}`)" if target.include_failed else "(not pushed; --include-failed)")),
        ("Tokens", ", ".join(f"{v} {k.replace('_tokens', '')}" for k, v in sorted(facts.tokens.items()))
         or "not recorded by this task"),
        ("Cost", _cost(facts.spend, per="image" if spec.get("task") == "text-to-image" else "token")),
        ("Last run", f"{summary.get('outcome')} ({summary.get('started_at')})" if summary else "no run finished yet"),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if prompt.get("template"):
        lines += ["", "Prompt template:", "", _fenced(str(prompt["template"]), "text")]
    if prompt.get("system"):
        lines += ["", "System prompt:", "", _fenced(str(prompt["system"]), "text")]
    lines += ["", "### Reproduce", "", _reproduce(facts, target), "",
              "The spec (`job.yaml`); its input paths are those of the machine that ran it:", "",
              _fenced(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), "yaml")]
    if facts.example_rows:
        columns = facts.example_columns
        # Model text as text: an answer holding `</table>` or `<!--` must not swallow the rest of the card.
        lines += ["", "### Sample rows", "", "| " + " | ".join(_cell(c) for c in columns) + " |",
                  "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in facts.example_rows]
    if with_thumbnails:
        lines += ["", f"![The first images of config {target.config}]({target.thumbnails_path()})"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A table cell's text with HTML escaped (markdown passes raw HTML through to the page)."""
    return html.escape(text, quote=False)


def _endpoint_ref(spec: dict[str, Any]) -> str:
    endpoint = spec.get("endpoint") or {}
    if endpoint.get("name"):
        return f"{endpoint.get('namespace')}/{endpoint['name']}"
    if endpoint.get("provider"):
        return f"Inference Providers ({endpoint['provider']}): {endpoint.get('model')}"
    if endpoint.get("url") and endpoint.get("model"):
        return f"{endpoint['url']} ({endpoint['model']})"
    return str(endpoint.get("url") or "the local emulator")


def _cost(spend: dict[str, Any] | None, *, per: str = "token") -> str:
    if not spend:
        return "not recorded"
    usd, hours, runs = spend.get("usd"), spend.get("replica_hours"), spend.get("runs")
    money = f"${usd:.4f}" if isinstance(usd, (int, float)) and usd else "price not known"
    if not hours and isinstance(usd, (int, float)) and usd:  # a serverless target: billed per token (or image)
        saved = spend.get("saved_usd")
        mode = f", ${saved:.4f} less than the online price (batch mode)" if isinstance(saved, (int, float)) and saved \
            else ""
        return f"{money}; {runs} run(s), billed per {per}{mode}"
    return f"{money}; {runs} run(s), {float(hours or 0):.4f} replica-hours"


def _reproduce(facts: JobFacts, target: Target) -> str:
    output = str((facts.spec.get("output") or {}).get("path") or "OUTPUT")
    push = ["batchrun", "push", output, "--repo", target.repo, "--config", target.config, "--split", target.split]
    if target.include_failed:
        push.append("--include-failed")
    if target.private:
        push.append("--private")
    lines = [f"pip install 'batchrun=={facts.version}'", "batchrun run job.yaml", shlex.join(push)]
    return _fenced("\n".join(lines), "bash")
