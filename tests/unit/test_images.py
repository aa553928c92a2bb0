"""Image helpers keep protocols.md §1, §2 and §4: checked bytes stored unchanged, exact data URLs,
Image columns that ``datasets`` decodes, and bad input images refused before any request."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchrun.errors import RequestFailed
from batchrun.images import (
    ACCEPT,
    IMAGE_FEATURE_TYPE,
    GeneratedImage,
    InputImage,
    check_generated_image,
    decode_json_image,
    derive_seed,
    image_output_schema,
    image_value,
    load_input_image,
    to_data_url,
)
from batchrun.output import OutputStore, ParquetSink, build_data_schema
from batchrun.records import RowResult

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data"
DATA_URL = re.compile(r"data:(?P<mime>image/[a-z]+);base64,(?P<payload>[A-Za-z0-9+/]*={0,2})")


def encoded(pil_format: str, size: tuple[int, int] = (40, 30), colour=(200, 40, 40), mode: str = "RGB") -> bytes:
    """A small picture in ``pil_format``: a colour with a lighter block, so resizing has detail."""
    image = Image.new(mode, size, colour if mode != "L" else 120)
    image.paste(Image.new(mode, (size[0] // 2, size[1] // 2), (250, 250, 250) if mode != "L" else 250), (0, 0))
    out = io.BytesIO()
    image.save(out, format=pil_format)
    return out.getvalue()


def noisy_jpeg() -> bytes:
    """A JPEG of noise: large enough (~25 KB) that a cut lands in the middle of the pixel data."""
    noise = bytes((i * 7919 + (i >> 3) * 104729) % 251 for i in range(200 * 200 * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", (200, 200), noise).save(out, format="JPEG")
    return out.getvalue()


# --------------------------------------------------------------------------------------------------
# The output schema


def test_image_feature_type_is_exactly_what_datasets_decodes():
    from datasets import Image as ImageFeature

    assert ImageFeature().pa_type == IMAGE_FEATURE_TYPE
    assert [f.name for f in IMAGE_FEATURE_TYPE] == ["bytes", "path"]
    assert IMAGE_FEATURE_TYPE.field("bytes").type == pa.binary()


def test_image_output_schema_names_every_column_and_declares_the_image():
    schema = image_output_schema()
    assert schema.names == ["image", "width", "height", "format", "seed"]
    assert [f.type for f in schema] == [IMAGE_FEATURE_TYPE, pa.int32(), pa.int32(), pa.string(), pa.int64()]
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert set(features) == set(schema.names)


def test_data_schema_built_from_the_image_output_schema_loads_in_datasets_as_pil_images(tmp_path):
    import datasets

    input_schema = pa.schema([("prompt", pa.string())])
    schema = build_data_schema(input_schema, id_column=None, keep_columns=None, output_schema=image_output_schema())
    png, jpeg = encoded("PNG"), encoded("JPEG", (32, 32))
    table = pa.table(
        {
            "id": pa.array([0, 1], pa.int64()),
            "prompt": ["a red fox", "a blue lake"],
            "image": [image_value(png), image_value(jpeg, path="1.jpeg")],
            "width": pa.array([40, 32], pa.int32()),
            "height": pa.array([30, 32], pa.int32()),
            "format": ["png", "jpeg"],
            "seed": pa.array([7, derive_seed(1)], pa.int64()),
            "latency_s": [0.5, 0.25],
            "attempts": pa.array([1, 2], pa.int32()),
        },
        schema=schema,
    )
    pq.write_table(table, tmp_path / "part-00000.parquet")

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "part-00000.parquet"), split="train")

    assert isinstance(ds.features["image"], datasets.Image)
    first, second = ds[0]["image"], ds[1]["image"]
    assert isinstance(first, Image.Image) and first.size == (40, 30) and first.format == "PNG"
    assert isinstance(second, Image.Image) and second.size == (32, 32) and second.format == "JPEG"
    # Stored unchanged: the bytes in the file are the endpoint's bytes.
    assert pq.read_table(tmp_path / "part-00000.parquet").column("image")[0].as_py()["bytes"] == png


def test_images_written_through_the_sink_load_in_datasets_as_pil_images(tmp_path):
    import datasets

    schema = build_data_schema(
        pa.schema([("key", pa.string()), ("prompt", pa.string())]),
        id_column="key", keep_columns=["prompt"], output_schema=image_output_schema(),
    )  # fmt: skip
    sink = ParquetSink(OutputStore(tmp_path / "out"), data_schema=schema, id_column="key")
    sink.open()
    body = encoded("WEBP", (24, 24))
    checked = check_generated_image(body, "image/webp", "webp")
    output = {"image": image_value(body), "width": checked.width, "height": checked.height,
              "format": checked.format, "seed": derive_seed("a")}  # fmt: skip
    sink.add(RowResult(position=0, id="a", kept={"prompt": "a cat"}, output=output, latency_s=0.1, attempts=1))
    sink.close()

    [shard] = (tmp_path / "out" / "data").glob("*.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(shard), split="train")
    assert ds[0]["image"].size == (24, 24)
    assert ds[0]["format"] == "webp"


# --------------------------------------------------------------------------------------------------
# Seeds


def test_derive_seed_differs_between_ids_and_job_seeds_and_stays_in_range():
    seeds = [derive_seed(i) for i in range(1000)]
    assert len(set(seeds)) == 1000
    assert all(0 <= s <= 2**31 - 1 for s in seeds)
    assert derive_seed("a", job_seed=1) != derive_seed("a", job_seed=0)
    assert derive_seed("a") == derive_seed("a", job_seed=0)


# --------------------------------------------------------------------------------------------------
# Generated images


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_check_generated_image_accepts_a_real_image_in_the_asked_format(fmt, pil_format):
    body = encoded(pil_format, (64, 48))
    assert check_generated_image(body, ACCEPT[fmt], fmt) == GeneratedImage(width=64, height=48, format=fmt)


def test_check_generated_image_trusts_the_bytes_over_a_missing_or_wrong_content_type():
    assert check_generated_image(encoded("PNG"), None, "png").format == "png"
    assert check_generated_image(encoded("PNG"), "application/octet-stream", "png").format == "png"


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"error": "Model is loading"}',
        b"",
        encoded("PNG", (64, 64))[:-40],  # truncated PNG
        noisy_jpeg()[:2000],  # a JPEG cut in its scan data: only a full decode notices
    ],
    ids=["html", "json", "empty", "truncated-png", "truncated-jpeg"],
)
def test_a_200_that_is_not_an_image_is_a_retryable_failure(body):
    with pytest.raises(RequestFailed) as caught:
        check_generated_image(body, "text/html", "png")
    assert caught.value.error_type == "not_an_image"
    assert caught.value.retryable is True
    assert caught.value.status == 200


def test_a_failure_message_shows_the_start_of_the_body_but_not_all_of_it():
    page = b"<html>" + b"x" * 10_000 + b"</html>"
    with pytest.raises(RequestFailed) as caught:
        check_generated_image(page, "text/html; charset=utf-8", "png")
    assert "<html>" in caught.value.message and "text/html" in caught.value.message
    assert len(caught.value.message) < 400


def test_an_image_in_another_format_than_asked_is_a_retryable_failure():
    with pytest.raises(RequestFailed) as caught:
        check_generated_image(encoded("JPEG"), "image/jpeg", "png")
    assert caught.value.error_type == "wrong_image_format"
    assert caught.value.retryable is True
    assert "png" in caught.value.message and "jpeg" in caught.value.message


def test_an_unknown_expected_format_is_a_programming_error():
    with pytest.raises(ValueError, match="gif"):
        check_generated_image(encoded("PNG"), "image/png", "gif")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda b64: json.dumps(b64),
        lambda b64: json.dumps([b64]),
        lambda b64: json.dumps({"image": b64}),
        lambda b64: json.dumps("data:image/png;base64," + b64),
    ],
    ids=["string", "list", "object", "data-url"],
)
def test_decode_json_image_returns_the_png_bytes_of_a_json_answer(wrap):
    png = encoded("PNG")
    body = wrap(base64.b64encode(png).decode()).encode()
    assert decode_json_image(body) == png
    assert check_generated_image(decode_json_image(body), "image/png", "png").width == 40


@pytest.mark.parametrize("body", [b"not json", b'{"error": "x"}', b'"@@@ not base64"', b"[1, 2]"])
def test_decode_json_image_refuses_an_answer_without_an_image(body):
    with pytest.raises(RequestFailed) as caught:
        decode_json_image(body)
    assert caught.value.error_type == "not_an_image" and caught.value.retryable


# --------------------------------------------------------------------------------------------------
# Input images


def test_load_input_image_from_a_datasets_image_value_keeps_the_bytes_and_finds_the_real_mime():
    jpeg = encoded("JPEG", (50, 20))
    # The path says PNG; the bytes are a JPEG, and the bytes win.
    image = load_input_image({"bytes": jpeg, "path": "photo.png"})
    assert image == InputImage(data=jpeg, mime="image/jpeg", width=50, height=20, path="photo.png")


def test_load_input_image_from_a_datasets_value_with_only_a_path_reads_the_file(tmp_path):
    (tmp_path / "pic.png").write_bytes(encoded("PNG"))
    image = load_input_image({"bytes": None, "path": "pic.png"}, base_dir=tmp_path)
    assert (image.mime, image.size) == ("image/png", (40, 30))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_load_input_image_from_raw_bytes(kind):
    image = load_input_image(kind(encoded("WEBP")))
    assert isinstance(image.data, bytes) and image.mime == "image/webp" and image.size == (40, 30)


def test_load_input_image_from_a_local_path_string_or_path(tmp_path):
    (tmp_path / "a.bmp").write_bytes(encoded("BMP"))
    by_string = load_input_image(str(tmp_path / "a.bmp"))
    by_path = load_input_image(tmp_path / "a.bmp")
    relative = load_input_image("a.bmp", base_dir=tmp_path)
    assert by_string.mime == by_path.mime == relative.mime == "image/bmp"
    assert by_string.data == by_path.data == relative.data


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://127.0.0.1:8080/x.jpg"])
def test_an_http_url_is_passed_through_without_fetching(url):
    image = load_input_image(url)
    assert image.url == url and image.data is None
    assert to_data_url(image, max_side=64) == (url, {"original_size": None, "sent_size": None, "downsized": False})


def test_load_input_image_from_a_data_url_decodes_it():
    png = encoded("PNG")
    image = load_input_image("data:image/png;base64," + base64.b64encode(png).decode())
    assert image.data == png and image.mime == "image/png"


@pytest.mark.parametrize(
    "value",
    [
        b"definitely not an image",
        encoded("PNG", (64, 64))[:-40],
        b"",
        None,
        {"bytes": None, "path": None},
        {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": "broken.png"},
        "data:image/png;base64,@@@",
        "data:text/plain,hello",
        42,
    ],
    ids=["garbage", "truncated", "empty", "null", "empty-value", "broken-png", "bad-base64", "not-base64", "int"],
)
def test_an_undecodable_or_missing_input_image_is_a_bad_image_never_retried(value):
    with pytest.raises(RequestFailed) as caught:
        load_input_image(value)
    assert caught.value.error_type == "bad_image"
    assert caught.value.retryable is False
    assert caught.value.status is None


def test_a_bad_image_message_never_shows_a_python_object_repr():
    with pytest.raises(RequestFailed) as caught:
        load_input_image({"bytes": b"certainly not a picture", "path": None})
    assert "cannot identify image file" in caught.value.message
    assert "object at 0x" not in caught.value.message and "BytesIO" not in caught.value.message


def test_a_bad_image_message_names_the_path(tmp_path):
    with pytest.raises(RequestFailed, match="missing.png") as caught:
        load_input_image(str(tmp_path / "missing.png"))
    assert caught.value.error_type == "bad_image"
    with pytest.raises(RequestFailed, match="broken.png"):
        load_input_image({"bytes": b"nope", "path": "broken.png"})
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(RequestFailed, match="empty.jpg.*empty"):
        load_input_image(tmp_path / "empty.jpg")


def test_the_sample_vision_images_all_load():
    table = pq.read_table(SAMPLE_DATA / "vision.parquet")
    images = [load_input_image(v) for v in table.column("image").to_pylist()]
    assert len(images) == 6
    assert {i.mime for i in images} == {"image/png", "image/jpeg"}
    assert all(max(i.size) <= 128 for i in images)


# --------------------------------------------------------------------------------------------------
# Data URLs


def _decode_data_url(url: str) -> tuple[str, Image.Image, bytes]:
    match = DATA_URL.fullmatch(url)
    assert match is not None, url[:60]
    raw = base64.b64decode(match["payload"], validate=True)
    return match["mime"], Image.open(io.BytesIO(raw)), raw


@pytest.mark.parametrize(("pil_format", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_a_small_image_is_sent_as_its_own_bytes_in_an_exact_data_url(pil_format, mime):
    data = encoded(pil_format)
    url, report = to_data_url(load_input_image(data), max_side=None)
    assert url == f"data:{mime};base64,{base64.b64encode(data).decode()}"
    got_mime, _, raw = _decode_data_url(url)
    assert (got_mime, raw) == (mime, data)
    assert report == {"original_size": [40, 30], "sent_size": [40, 30], "downsized": False}


def test_an_image_within_max_side_is_not_touched():
    data = encoded("JPEG", (64, 48))
    url, report = to_data_url(load_input_image(data), max_side=64)
    assert _decode_data_url(url)[2] == data and report["downsized"] is False


@pytest.mark.parametrize(("pil_format", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_a_large_image_is_downsized_keeping_its_aspect_ratio_and_format(pil_format, mime):
    url, report = to_data_url(load_input_image(encoded(pil_format, (400, 300))), max_side=100)
    got_mime, picture, _ = _decode_data_url(url)
    assert got_mime == mime and picture.format == pil_format
    assert picture.size == (100, 75)
    assert report == {"original_size": [400, 300], "sent_size": [100, 75], "downsized": True}


def test_a_tall_image_is_downsized_by_its_height():
    _, report = to_data_url(load_input_image(encoded("PNG", (90, 360))), max_side=120)
    assert report["sent_size"] == [30, 120]


@pytest.mark.parametrize("pil_format", ["BMP", "TIFF", "GIF"])
def test_formats_a_server_may_not_read_are_sent_as_png(pil_format):
    url, report = to_data_url(load_input_image(encoded(pil_format)), max_side=None)
    mime, picture, _ = _decode_data_url(url)
    assert (mime, picture.format, picture.size) == ("image/png", "PNG", (40, 30))
    assert report["downsized"] is False


def test_a_cmyk_tiff_becomes_an_rgb_png():
    url, _ = to_data_url(load_input_image(encoded("TIFF", mode="CMYK", colour=(0, 200, 200, 0))), max_side=None)
    mime, picture, _ = _decode_data_url(url)
    assert mime == "image/png" and picture.mode == "RGB"


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_max_side_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="max_side"):
        to_data_url(load_input_image(encoded("PNG")), max_side=bad)


def test_an_image_over_pillows_pixel_limit_is_a_bad_image(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(RequestFailed, match="pixels") as caught:
        load_input_image(encoded("PNG", (20, 20)))
    assert caught.value.error_type == "bad_image"


def test_a_downsized_jpeg_keeps_its_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when shown
    out = io.BytesIO()
    Image.new("RGB", (400, 200), (10, 120, 200)).save(out, format="JPEG", exif=exif.tobytes())
    url, report = to_data_url(load_input_image(out.getvalue()), max_side=100)
    _, picture, _ = _decode_data_url(url)
    assert report["sent_size"] == [100, 50]
    assert picture.getexif().get(0x0112) == 6
