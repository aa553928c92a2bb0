"""The public surface stays small, sorted and importable."""

import batchrun


def test_all_is_sorted_and_every_name_in_it_exists():
    assert batchrun.__all__ == sorted(batchrun.__all__)
    for name in batchrun.__all__:
        assert getattr(batchrun, name) is not None


def test_every_public_error_carries_an_exit_code_from_the_contract():
    errors = [getattr(batchrun, n) for n in batchrun.__all__ if isinstance(getattr(batchrun, n), type)
              and issubclass(getattr(batchrun, n), batchrun.BatchrunError)]
    assert errors
    assert {e.exit_code for e in errors} <= {2, 3}


def test_the_cli_help_names_every_command_and_the_exit_codes(capsys):
    import pytest

    from batchrun.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for command in ("validate", "run", "status", "endpoint", "emulate"):
        assert command in text
    assert "exit codes" in text and "HF_TOKEN" in text


def test_a_summary_interval_of_zero_or_less_is_refused_with_a_clear_message(capsys):
    import pytest

    from batchrun.cli import main

    for value in ("0", "-5", "soon"):
        with pytest.raises(SystemExit) as refused:
            main(["run", "jobs/quickstart.yaml", "--summary-every", value])
        assert refused.value.code == 2
        assert "--summary-every" in capsys.readouterr().err
