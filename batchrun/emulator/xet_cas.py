"""A Xet CAS server, as hf_xet (the Rust client huggingface_hub drives) uploads to it and downloads from it.

Every Hugging Face Storage Bucket upload goes through Xet: the Hub hands out a token and a ``casUrl``
(``/api/buckets/{id}/xet-write-token``), the client cuts the bytes into chunks, packs them into xorbs,
``POST``s each xorb to ``{casUrl}/v1/xorbs/default/{hash}`` and then a shard to ``{casUrl}/v1/shards``
naming, for every file, its hash and the ``(xorb, chunk range)`` terms that rebuild it. A download asks
``{casUrl}/v1/reconstructions/{file_hash}`` for those terms and fetches byte ranges of the xorbs.

This server keeps what serving needs (xet-core's formats, ``xet_core_structures``):

- a xorb is a run of chunks, each an 8-byte header (version 0, 3-byte little-endian compressed length,
  compression scheme, 3-byte uncompressed length) and its bytes, then a footer starting ``XETBLOB``:
  the headers give each chunk's byte offset and unpacked size;
- a shard starts with a 48-byte header (32-byte tag, version, footer size), then the file-info section:
  per file a 48-byte header (hash, flags, entry count), that many 48-byte entries (xorb hash, flags,
  unpacked bytes, chunk start, chunk end), a verification entry per term when flags bit 31 is set and one
  metadata entry when bit 30 is; a header whose hash is all ``0xff`` ends the section;
- a hash is 32 bytes read as four little-endian u64, written in hex as four 16-digit numbers
  (each 8-byte group's bytes reversed), the form every URL and ``xetHash`` uses.

Global dedup queries (``/v1/chunks/default-merkledb/{hash}``) answer 404 (nothing known), the v2
reconstruction and shard routes answer 404 (the client falls back to v1), telemetry is accepted.
Tokens: ``issue(scope)`` makes one; reads need any issued token, uploads a write one.
"""

from __future__ import annotations

import json
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PREFIX = "/xet-cas"  # where the CAS lives on the emulator's control port: the casUrl the Hub answers
SHARD_TAG = bytes([*b"HFRepoMetaData", 0, 85, 105, 103, 69, 106, 123, 129, 87, 131, 165, 189, 217, 92, 205, 209,
                    74, 169])
_ENTRY = 48
_WITH_VERIFICATION = 1 << 31
_WITH_METADATA_EXT = 1 << 30
_BOOKEND = b"\xff" * 32


class XetFormatError(ValueError):
    """Bytes that are not a xorb or a shard as hf_xet writes them."""


def hash_hex(raw: bytes) -> str:
    """xet-core's hex form of a 32-byte hash: each little-endian u64 printed as a 16-digit number."""
    return "".join(raw[i:i + 8][::-1].hex() for i in range(0, 32, 8))


@dataclass
class Xorb:
    data: bytes
    offsets: list[int]  # byte offset of each chunk, then the end of the last
    sizes: list[int]  # each chunk's unpacked size


@dataclass
class Term:
    xorb: str
    start: int  # chunk range [start, end)
    end: int
    unpacked: int


def parse_xorb(data: bytes) -> Xorb:
    """The chunks of a serialized xorb: their byte offsets and unpacked sizes, up to the footer."""
    offsets, sizes, at = [0], [], 0
    while at + 8 <= len(data) and data[at] == 0:
        compressed = int.from_bytes(data[at + 1:at + 4], "little")
        sizes.append(int.from_bytes(data[at + 5:at + 8], "little"))
        at += 8 + compressed
        if at > len(data):
            raise XetFormatError("a chunk runs past the end of the xorb")
        offsets.append(at)
    if not sizes:
        raise XetFormatError("no chunk in the xorb")
    return Xorb(data=data, offsets=offsets, sizes=sizes)


def parse_shard_files(data: bytes) -> dict[str, list[Term]]:
    """The file-info section of a shard: each file hash and the terms that rebuild it."""
    if len(data) < 48 or data[:32] != SHARD_TAG:
        raise XetFormatError("not a shard (wrong tag)")
    files: dict[str, list[Term]] = {}
    at = 48
    while True:
        if at + _ENTRY > len(data):
            raise XetFormatError("the file-info section has no end")
        raw_hash = data[at:at + 32]
        flags, count = struct.unpack_from("<II", data, at + 32)
        at += _ENTRY
        if raw_hash == _BOOKEND:
            return files
        terms = []
        for _ in range(count):
            xorb = hash_hex(data[at:at + 32])
            _, unpacked, start, end = struct.unpack_from("<IIII", data, at + 32)
            terms.append(Term(xorb=xorb, start=start, end=end, unpacked=unpacked))
            at += _ENTRY
        at += _ENTRY * (count if flags & _WITH_VERIFICATION else 0) + (_ENTRY if flags & _WITH_METADATA_EXT else 0)
        files[hash_hex(raw_hash)] = terms


@dataclass
class XetCas:
    """The xorbs and file reconstructions uploaded, and the tokens the Hub issued."""

    base_url: str = ""
    xorbs: dict[str, Xorb] = field(default_factory=dict)
    files: dict[str, list[Term]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # token -> "read" | "write"
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.base_url + PREFIX

    def issue(self, scope: str) -> str:
        token = f"xet-{scope}-{secrets.token_hex(8)}"
        self.tokens[token] = scope
        return token

    def file_size(self, file_hash: str) -> int | None:
        terms = self.files.get(file_hash)
        return None if terms is None else sum(t.unpacked for t in terms)

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post(PREFIX + "/v1/xorbs/{prefix}/{hash}", self._xorb_upload)
        r.add_post(PREFIX + "/v1/shards", self._shard_upload)
        r.add_get(PREFIX + "/v1/chunks/{prefix}/{hash}", self._dedup)
        r.add_get(PREFIX + "/v1/reconstructions/{hash}", self._reconstruction)
        r.add_post(PREFIX + "/v1/telemetry", self._telemetry)
        r.add_get(PREFIX + "/fetch/{hash}", self._fetch)

    # ----- plumbing

    def _answer(self, request: web.Request, response: web.Response) -> web.Response:
        self.log.append({"method": request.method, "path": request.path, "status": response.status,
                         "range": request.headers.get("Range")})
        return response

    def _refusal(self, request: web.Request, scope: str) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        held = self.tokens.get(auth.removeprefix("Bearer "))
        if held is None:
            return self._answer(request, web.json_response({"error": "invalid or expired token"}, status=401))
        if scope == "write" and held != "write":
            return self._answer(request, web.json_response({"error": "token has read scope"}, status=403))
        return None

    # ----- routes

    async def _xorb_upload(self, request: web.Request) -> web.Response:
        if refusal := self._refusal(request, "write"):
            return refusal
        key = request.match_info["hash"]
        body = await request.read()
        if request.match_info["prefix"] != "default":
            return self._answer(request, web.json_response({"error": "unknown prefix"}, status=400))
        try:
            xorb = parse_xorb(body)
        except XetFormatError as err:
            return self._answer(request, web.json_response({"error": str(err)}, status=400))
        inserted = key not in self.xorbs
        self.xorbs.setdefault(key, xorb)
        return self._answer(request, web.json_response({"was_inserted": inserted}))

    async def _shard_upload(self, request: web.Request) -> web.Response:
        if refusal := self._refusal(request, "write"):
            return refusal
        try:
            files = parse_shard_files(await request.read())
        except XetFormatError as err:
            return self._answer(request, web.json_response({"error": str(err)}, status=400))
        for file_hash, terms in files.items():
            for term in terms:
                xorb = self.xorbs.get(term.xorb)
                if xorb is None or term.end > len(xorb.sizes) or term.start >= term.end:
                    message = f"file {file_hash} names chunks {term.start}..{term.end} of xorb {term.xorb}, not held"
                    return self._answer(request, web.json_response({"error": message}, status=400))
        known = all(h in self.files for h in files)
        self.files.update(files)
        return self._answer(request, web.json_response({"result": 0 if known else 1}))

    async def _dedup(self, request: web.Request) -> web.Response:
        if refusal := self._refusal(request, "read"):
            return refusal
        return self._answer(request, web.Response(status=404))

    async def _telemetry(self, request: web.Request) -> web.Response:
        await request.read()
        return self._answer(request, web.Response(status=200))

    async def _reconstruction(self, request: web.Request) -> web.Response:
        if refusal := self._refusal(request, "read"):
            return refusal
        terms = self.files.get(request.match_info["hash"])
        if terms is None:
            return self._answer(request, web.json_response({"error": "file not found"}, status=404))
        size = sum(t.unpacked for t in terms)
        first, last = 0, size - 1
        header = request.headers.get("Range")
        if header:
            try:
                start, _, end = header.removeprefix("bytes=").partition("-")
                first, last = int(start), min(int(end), size - 1)
            except ValueError:
                return self._answer(request, web.json_response({"error": "bad range"}, status=400))
            if first >= size or first > last:
                return self._answer(request, web.Response(status=416))
        body = self._reconstruct(terms, first, last)
        return self._answer(request, web.json_response(body))

    def _reconstruct(self, terms: list[Term], first: int, last: int) -> dict[str, Any]:
        """The v1 answer for bytes first..last: the chunks covering them, grouped by term, and where to fetch them."""
        picked: list[Term] = []
        offset_into_first = 0
        at = 0
        for term in terms:
            xorb = self.xorbs[term.xorb]
            for chunk in range(term.start, term.end):
                size = xorb.sizes[chunk]
                if at + size > first and at <= last:
                    if not picked:
                        offset_into_first = first - at
                    if picked and picked[-1].xorb == term.xorb and picked[-1].end == chunk:
                        picked[-1].end, picked[-1].unpacked = chunk + 1, picked[-1].unpacked + size
                    else:
                        picked.append(Term(term.xorb, chunk, chunk + 1, size))
                at += size
        fetch: dict[str, list[dict[str, Any]]] = {}
        for term in picked:
            offsets = self.xorbs[term.xorb].offsets
            entry = {"range": {"start": term.start, "end": term.end}, "url": f"{self.url}/fetch/{term.xorb}",
                     "url_range": {"start": offsets[term.start], "end": offsets[term.end] - 1}}
            if entry not in fetch.setdefault(term.xorb, []):
                fetch[term.xorb].append(entry)
        return {"offset_into_first_range": offset_into_first,
                "terms": [{"hash": t.xorb, "unpacked_length": t.unpacked, "range": {"start": t.start, "end": t.end}}
                          for t in picked],
                "fetch_info": fetch}

    async def _fetch(self, request: web.Request) -> web.Response:
        """A xorb's bytes, by the one range its presigned url was given for (like a CDN url, no token)."""
        xorb = self.xorbs.get(request.match_info["hash"])
        if xorb is None:
            return self._answer(request, web.Response(status=404))
        header = request.headers.get("Range", "")
        try:
            start, _, end = header.removeprefix("bytes=").partition("-")
            first, last = int(start), int(end)
        except ValueError:
            return self._answer(request, web.Response(body=xorb.data))
        if first >= len(xorb.data):
            return self._answer(request, web.Response(status=416))
        last = min(last, len(xorb.data) - 1)
        return self._answer(request, web.Response(
            status=206, body=xorb.data[first:last + 1],
            headers={"Content-Range": f"bytes {first}-{last}/{len(xorb.data)}"}))


def token_answer(cas: XetCas, scope: str, expires_at: int) -> web.Response:
    """What ``/api/buckets/{id}/xet-{scope}-token`` answers: the JSON hf_xet reads, headers huggingface_hub reads."""
    token = cas.issue(scope)
    body = {"casUrl": cas.url, "exp": expires_at, "accessToken": token}
    headers = {"X-Xet-Cas-Url": cas.url, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(expires_at)}
    return web.Response(text=json.dumps(body), content_type="application/json", headers=headers)
