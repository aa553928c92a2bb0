"""preview writes only into a batchrun output; a webhook url's ${VAR} is read from the environment or refused."""

from __future__ import annotations

import asyncio

import pytest
from jobkit import write_spec, write_topics

from batchrun.cli import main
from batchrun.errors import SpecError
from batchrun.preflight import preflight
from batchrun.spec import load_spec, parse_spec


def test_preview_refuses_a_folder_that_is_not_a_batchrun_output(tmp_path, capsys):
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["preview", str(folder)]) == 2
    assert "not a batchrun output folder" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # nothing written into it


def _spec_with_webhook(tmp_path, webhook: str):
    input_path = write_topics(tmp_path / "topics.parquet", 3)
    return write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9"}, input_path=input_path,
                      notify={"webhook": webhook})


@pytest.mark.parametrize("webhook", ["https://hooks.example.com/services/${HOOK_PATH}", "${HOOK_URL}"])
def test_validate_refuses_a_webhook_naming_an_unset_variable(tmp_path, monkeypatch, capsys, webhook):
    monkeypatch.delenv("HOOK_PATH", raising=False)
    monkeypatch.delenv("HOOK_URL", raising=False)
    spec = _spec_with_webhook(tmp_path, webhook)
    with pytest.raises(SpecError) as info:
        asyncio.run(preflight(load_spec(spec)))
    assert info.value.key == "notify.webhook"
    assert ("HOOK_PATH" if "PATH" in webhook else "HOOK_URL") in info.value.problem
    assert main(["validate", str(spec)]) == 2
    assert "notify.webhook" in capsys.readouterr().err


def test_a_variable_inside_the_url_is_read_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_PATH", "T000/B000/xyz")
    notify = load_spec(_spec_with_webhook(tmp_path, "https://hooks.example.com/services/${HOOK_PATH}")).notify
    assert notify is not None
    assert notify.url() == "https://hooks.example.com/services/T000/B000/xyz"
    monkeypatch.delenv("HOOK_PATH")
    assert notify.url() is None  # never posted with ${HOOK_PATH} in it


def test_a_malformed_reference_is_a_spec_error():
    with pytest.raises(SpecError, match="environment variable"):
        parse_spec({"task": "chat-completion", "input": {"parquet": "a.parquet"}, "prompt": {"column": "q"},
                    "endpoint": {"url": "http://h:1"}, "notify": {"webhook": "https://h/${HOOK-PATH}"}})
