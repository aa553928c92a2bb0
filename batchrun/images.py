"""Images in and out of a job: checked, described and encoded, with no I/O beyond local files.

Two tasks use this module (protocols.md §1, §2, §4):

- **text-to-image** asks for one image per row, checks that the bytes that came back really are an
  image of the requested format (:func:`check_generated_image`), and stores them *unchanged* in a
  ``datasets`` Image column (:data:`IMAGE_FEATURE_TYPE`, :func:`image_output_schema`). The seed is
  taken from a column or derived from the row id (:func:`derive_seed`).
- **image-text-to-text** reads an image from an input column (:func:`load_input_image`), which
  refuses what cannot be decoded *before* any request is sent (reliability.md §5), and turns it into
  the exact ``data:<mime>;base64,<payload>`` URL that TGI accepts (:func:`to_data_url`).

Failures are :class:`~batchrun.errors.RequestFailed` with a stable ``error_type``:

    not_an_image         a 200 whose body is not an image (HTML, JSON, truncated bytes)  retryable
    wrong_image_format   an image, but not in the format that was asked for               retryable
    bad_image            an input image that is missing, unreadable or undecodable       never retried
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchrun.errors import RequestFailed
from batchrun.records import FailureType

if TYPE_CHECKING:  # Pillow is imported where an image is decoded: a text job never loads it
    from PIL import Image

__all__ = [
    "ACCEPT",
    "IMAGE_FEATURE_TYPE",
    "GeneratedImage",
    "InputImage",
    "check_generated_image",
    "decode_json_image",
    "derive_seed",
    "image_output_schema",
    "image_value",
    "load_input_image",
    "to_data_url",
]

#: The Arrow type ``datasets`` decodes as an ``Image``: this field order, ``binary`` not ``large_binary``.
IMAGE_FEATURE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

#: The ``Accept`` header that asks a text-to-image endpoint for raw bytes in each output format.
ACCEPT: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# Types a data URL may carry as they are, with Pillow's format for each; anything else (BMP, TIFF,
# GIF ...) is re-encoded as PNG, because vision servers and their image loaders may not read it.
_SENDABLE_MIMES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
# A JPEG with extra pictures (phone cameras) opens as MPO; its bytes are a valid JPEG.
_MIME_OVERRIDES = {"MPO": "image/jpeg"}
# Modes PNG can store; anything else (CMYK, YCbCr, F ...) is converted before saving.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
_SEED_MAX = 2**31 - 1
_URL_SCHEMES = ("http://", "https://")


# --------------------------------------------------------------------------------------------------
# Output side: text-to-image


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """What :func:`check_generated_image` learned about an endpoint's image: its size and format."""

    width: int
    height: int
    format: str  # "png", "jpeg" or "webp"


def image_output_schema() -> pa.Schema:
    """The output columns of a text-to-image job, with the metadata that makes ``image`` an Image.

    ``latency_s`` and ``attempts`` are not listed: the sink appends them to every data shard.
    """
    schema = pa.schema(
        [
            pa.field("image", IMAGE_FEATURE_TYPE),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("format", pa.string()),
            pa.field("seed", pa.int64()),
        ]
    )
    # Every column is named (protocols.md §4); the sink's build_data_schema keeps a feature declared
    # here as long as its Arrow type matches, which is what turns the struct into an Image.
    features = {
        "image": {"_type": "Image"},
        "width": {"dtype": "int32", "_type": "Value"},
        "height": {"dtype": "int32", "_type": "Value"},
        "format": {"dtype": "string", "_type": "Value"},
        "seed": {"dtype": "int64", "_type": "Value"},
    }
    return schema.with_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})


def image_value(data: bytes, *, path: str | None = None) -> dict[str, Any]:
    """A cell of an Image column: the bytes as they came, and an optional file name."""
    return {"bytes": data, "path": path}


def derive_seed(row_id: Any, job_seed: int = 0, *draw: int | str) -> int:
    """A seed in ``[0, 2**31 - 1]`` for a row without one: the same for the same id in every process.

    Built from SHA-256 of the id's text, not ``hash()``, which is salted per process for strings.
    ``job_seed`` lets two jobs over the same ids draw different pictures. ``draw`` tells apart the
    draws of one row (a sample index, a try after an invalid answer); with none, the seed is the one
    a row has always had.
    """
    material = ":".join([str(job_seed), str(row_id), *(str(part) for part in draw)])
    digest = hashlib.sha256(material.encode()).digest()
    return int.from_bytes(digest[:8], "big") & _SEED_MAX


def check_generated_image(body: bytes, content_type: str | None, expected_format: str | None) -> GeneratedImage:
    """Check that a 200's body is a whole image in ``expected_format`` (None: any of png, jpeg and webp,
    for a server that chooses the format itself); the bytes are not changed.

    Raises ``RequestFailed(FailureType.NOT_AN_IMAGE)`` when Pillow cannot decode it, and
    ``RequestFailed(FailureType.WRONG_IMAGE_FORMAT)`` when it is another format. Both are retryable: a
    proxy's error page or a half-sent body is a transient fault, not a verdict on the prompt.
    """
    wanted = _normalise_format(expected_format) if expected_format is not None else None
    where = f" (Content-Type {content_type})" if content_type else ""
    if not body:
        raise RequestFailed(FailureType.NOT_AN_IMAGE, f"the endpoint answered 200 with an empty body{where}",
                            status=200, retryable=True)  # fmt: skip
    try:
        pil_format, width, height = _decode(bytes(body))
    except _Undecodable as exc:
        raise RequestFailed(
            FailureType.NOT_AN_IMAGE,
            f"the endpoint answered 200 with a body that is not an image{where}: {exc}; it starts {_snippet(body)}",
            status=200,
            retryable=True,
        ) from None
    got = pil_format.lower()
    if got != wanted and (wanted is not None or got not in ACCEPT):
        raise RequestFailed(
            FailureType.WRONG_IMAGE_FORMAT,
            f"asked for {wanted} (Accept: {ACCEPT[wanted]}) but the endpoint sent {got}{where}" if wanted else
            f"the endpoint sent a {got} image{where}; batchrun stores {', '.join(ACCEPT)}",
            status=200,
            retryable=True,
        )
    return GeneratedImage(width=width, height=height, format=got)


def decode_json_image(body: bytes) -> bytes:
    """The image bytes in a text-to-image JSON answer (sent when there is no ``Accept`` or ``*/*``).

    Accepts a JSON string of base64 (what the toolkit sends), a one-element list of it, or an object
    holding it under ``image``, ``generated_image`` or ``b64_json``; a ``data:`` prefix is tolerated.
    Check the result with :func:`check_generated_image` (``expected_format="png"``).
    """
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestFailed(FailureType.NOT_AN_IMAGE,
                            f"the endpoint's answer is neither an image nor JSON: {_snippet(body)}",
                            status=200, retryable=True) from None  # fmt: skip
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, dict):
        answer = next((answer[k] for k in ("image", "generated_image", "b64_json") if isinstance(answer.get(k), str)),
                      None)  # fmt: skip
    if not isinstance(answer, str):
        raise RequestFailed(FailureType.NOT_AN_IMAGE,
                            f"the endpoint's JSON answer holds no base64 image: {_snippet(body)}",
                            status=200, retryable=True)  # fmt: skip
    payload = answer.split(",", 1)[1] if answer.startswith("data:") else answer
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestFailed(FailureType.NOT_AN_IMAGE, "the endpoint's JSON answer is a string but not valid base64",
                            status=200, retryable=True) from None  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Input side: image-text-to-text


@dataclass(frozen=True, slots=True)
class InputImage:
    """An input image ready to send: decoded once to prove it is an image, or a URL passed through.

    For a decoded image, ``data`` holds the bytes as given, ``mime`` comes from the real format (not
    the file name), and ``width``/``height`` are its pixel size. For an http(s) URL, only ``url`` is
    set: the server fetches it. ``path`` is where the image came from, for messages and reports.
    """

    data: bytes | None = None
    mime: str | None = None
    width: int | None = None
    height: int | None = None
    url: str | None = None
    path: str | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        """``(width, height)``, or None for a pass-through URL."""
        return None if self.width is None or self.height is None else (self.width, self.height)


def load_input_image(value: Any, *, base_dir: str | os.PathLike[str] | None = None) -> InputImage:
    """Read one input image cell, whatever shape it comes in, and check that it decodes.

    ``value`` may be a ``datasets`` Image cell (``{"bytes", "path"}``; bytes may be None when the path
    is set), raw ``bytes``/``bytearray``/``memoryview``, a local path (``str`` or ``PathLike``,
    relative ones resolved against ``base_dir``), a ``data:`` URL, or an http(s) URL, which is passed
    through unfetched. Anything missing, unreadable or undecodable raises
    ``RequestFailed(FailureType.BAD_IMAGE, retryable=False)``: the row fails without a request being sent.
    """
    if value is None:
        raise _bad_image("the image is missing (the value is null)")
    if isinstance(value, dict):
        raw, path = value.get("bytes"), value.get("path")
        if raw:
            return _from_bytes(raw, path)
        if path:
            return load_input_image(path, base_dir=base_dir)
        raise _bad_image("the image is missing (an Image value with neither bytes nor path)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _from_bytes(value, None)
    if isinstance(value, str):
        text = value.strip()
        if text.lower().startswith(_URL_SCHEMES):
            return InputImage(url=text, path=text)
        if text.startswith("data:"):
            return _from_data_url(text)
        if not text:
            raise _bad_image("the image is missing (an empty path)")
        return _from_file(Path(text), base_dir)
    if isinstance(value, os.PathLike):
        return _from_file(Path(value), base_dir)
    raise _bad_image(f"cannot read an image from a {type(value).__name__} value")


def to_data_url(image: InputImage, *, max_side: int | None) -> tuple[str, dict[str, Any]]:
    """The URL to put in an ``image_url`` part, and a report of what was sent.

    A pass-through URL is returned unchanged (report sizes are None). Otherwise the result is exactly
    ``data:<mime>;base64,<payload>``. The original bytes are sent when they are PNG, JPEG or WebP and
    fit ``max_side``; a larger image is shrunk to fit, keeping its aspect ratio, and re-encoded in
    its format; other formats (BMP, TIFF, GIF ...) are re-encoded as PNG. The report is
    ``{"original_size": [w, h], "sent_size": [w, h], "downsized": bool}``.
    """
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}")
    if image.url is not None:
        return image.url, {"original_size": None, "sent_size": None, "downsized": False}
    if image.data is None or image.width is None or image.height is None or image.mime is None:
        raise ValueError("to_data_url needs an InputImage from load_input_image")

    original = [image.width, image.height]
    too_big = max_side is not None and max(image.width, image.height) > max_side
    target = _SENDABLE_MIMES.get(image.mime)
    if not too_big and target is not None:
        return _data_url(image.mime, image.data), {"original_size": original, "sent_size": original, "downsized": False}

    from PIL import Image

    with Image.open(io.BytesIO(image.data)) as opened:
        opened.load()
        info: dict[str, Any] = {str(k): v for k, v in opened.info.items()}
        picture = opened.copy()
    if too_big:
        assert max_side is not None
        # thumbnail keeps the aspect ratio and only ever shrinks.
        picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    target = target or "PNG"
    encoded = _encode(picture, target, info)
    sent = [picture.width, picture.height]
    return _data_url(Image.MIME[target], encoded), {"original_size": original, "sent_size": sent, "downsized": too_big}


# --------------------------------------------------------------------------------------------------
# Helpers


class _Undecodable(Exception):
    """Pillow could not decode the bytes; the message says why."""


def _decode(data: bytes) -> tuple[str, int, int]:
    """Fully decode ``data``: return (Pillow format, width, height), or raise :class:`_Undecodable`.

    ``verify()`` checks structure (PNG CRCs) but not pixel data, and ``load()`` decodes pixels but
    tolerates some damage verify catches, so both are run: a truncated JPEG fails only at ``load()``.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            # A decompression bomb is refused, not just warned about: one cell must not exhaust memory.
            # Checked by hand because turning the warning into an error is not thread-safe.
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and image.width * image.height > limit:
                raise _Undecodable(f"{image.width}x{image.height} pixels is more than the {limit} allowed")
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format is None:
                raise _Undecodable("unknown format")
            return image.format, image.width, image.height
    except _Undecodable:
        raise
    # Pillow plugins raise a zoo of exceptions on bad input (SyntaxError from some of them).
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise _Undecodable(_readable(exc)) from None


#: Python's default repr of an object (``<_io.BytesIO object at 0x7f...>``), which Pillow puts in messages.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _readable(exc: BaseException) -> str:
    """Pillow's message without the in-memory file's repr: "cannot identify image file" says it all."""
    text = _OBJECT_REPR.sub("", str(exc)).strip().rstrip(":").strip()
    return text or type(exc).__name__


def _from_bytes(raw: bytes | bytearray | memoryview, path: str | None) -> InputImage:
    data = bytes(raw)
    name = f" {path}" if path else ""
    if not data:
        raise _bad_image(f"the image{name} is empty (0 bytes)")
    try:
        pil_format, width, height = _decode(data)
    except _Undecodable as exc:
        raise _bad_image(f"the image{name} cannot be decoded: {exc}") from None
    from PIL import Image

    mime = _MIME_OVERRIDES.get(pil_format) or Image.MIME.get(pil_format, "application/octet-stream")
    return InputImage(data=data, mime=mime, width=width, height=height, path=path)


def _from_file(path: Path, base_dir: str | os.PathLike[str] | None) -> InputImage:
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _bad_image(f"cannot read the image file {path}: {exc.strerror or exc}") from None
    return _from_bytes(data, str(path))


def _from_data_url(url: str) -> InputImage:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not payload:
        raise _bad_image("the image is a data: URL that is not data:<mime>;base64,<payload>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_image("the image is a data: URL whose payload is not valid base64") from None
    return _from_bytes(data, None)


def _encode(picture: Image.Image, pil_format: str, info: dict[str, Any]) -> bytes:
    """Encode ``picture`` in ``pil_format``, keeping its colour profile."""
    if pil_format == "JPEG" and picture.mode not in ("L", "RGB", "CMYK"):
        picture = picture.convert("RGB")
    elif pil_format == "PNG" and picture.mode not in _PNG_MODES:
        picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
    # The colour profile and EXIF (orientation above all) travel with the pixels, as in the original.
    options: dict[str, Any] = {key: info[key] for key in ("icc_profile", "exif") if info.get(key)}
    if pil_format == "JPEG" or pil_format == "WEBP":
        options["quality"] = 90
    out = io.BytesIO()
    picture.save(out, format=pil_format, **options)
    return out.getvalue()


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _normalise_format(name: str) -> str:
    key = name.strip().lower()
    key = "jpeg" if key == "jpg" else key
    if key not in ACCEPT:
        raise ValueError(f"the image format must be one of {sorted(ACCEPT)}, got {name!r}")
    return key


def _bad_image(message: str) -> RequestFailed:
    return RequestFailed(FailureType.BAD_IMAGE, message, status=None, retryable=False)


def _snippet(body: bytes, limit: int = 80) -> str:
    """The start of a body, printable, for a failure message (a proxy's HTML page, a JSON error)."""
    text = bytes(body[:limit]).decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return repr(text + ("..." if len(body) > limit else ""))
