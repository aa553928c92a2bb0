"""Facts about batchrun that several modules rely on, each declared once.

    ExitCode                what every command exits with (README, "Exit codes"; reliability.md §6)
    ID_COLUMN               the output's id column when the job names none
    OPENAI_BATCH_ID         the id column of an OpenAI batch file
    MAX_MESSAGE_CHARS       the longest error text a failure row (or a score_error) stores
    GRACE_S                 how long requests in flight may finish after a stop (``--grace``)
    POLL_INTERVAL_S         how often the endpoint lifecycle reads the control plane while it waits
    READY_TIMEOUT_S         how long an endpoint may take to become ready (``endpoint.ready_timeout``)
    IDLE_BACKSTOP_S         the endpoint's own idle timeout while a job runs (``endpoint.idle_backstop``)
    CHECK_TIMEOUT_S         the deadline of one check of a server (its health route, ``GET /info``)
    CHECK_MAX_BYTES         the largest answer to such a check that is read
    MIN_SECRET_CHARS        the shortest value taken for a credential (and so masked wherever it appears)

This module imports nothing from batchrun: anything may import it. The error types of failure rows
are :class:`batchrun.records.FailureType`, beside the records that carry them.
"""

from __future__ import annotations

import enum

__all__ = [
    "CHECK_MAX_BYTES",
    "CHECK_TIMEOUT_S",
    "GRACE_S",
    "IDLE_BACKSTOP_S",
    "ID_COLUMN",
    "MAX_MESSAGE_CHARS",
    "MIN_SECRET_CHARS",
    "OPENAI_BATCH_ID",
    "POLL_INTERVAL_S",
    "READY_TIMEOUT_S",
    "ExitCode",
]


class ExitCode(enum.IntEnum):
    """What a batchrun command exits with. An ``int``: ``summary.json`` stores it as a plain number."""

    OK = 0  # every row succeeded, or there was nothing left to do; compare: no threshold crossed
    ROWS_FAILED = 1  # the job finished and some rows failed
    NOTHING_RAN = 2  # a spec, input, token or output problem found before anything ran; compare: bad runs
    STOPPED_EARLY = 3  # a signal, the budget, an outage...: run the same command again to resume
    THRESHOLD_CROSSED = 4  # `batchrun compare --fail-if`: a threshold was crossed


#: The output's id column when ``input.id_column`` names none (the id is then the row number).
ID_COLUMN = "id"
#: The id column of an OpenAI batch file (``input.openai_batch``), and of its output.
OPENAI_BATCH_ID = "custom_id"
#: The longest error text stored in a failure row or a ``score_error``: enough to read the reason, not
#: enough to bloat a Parquet file with an HTML error page. The rest is cut off.
MAX_MESSAGE_CHARS = 500
#: A value shorter than this is not taken for a credential. No token or API key is this short (an HF
#: token has 37 characters); a placeholder is ("x", ``EMPTY`` for a local vLLM server), and masking it
#: would rewrite every answer that happens to hold it, and every message.
MIN_SECRET_CHARS = 8
#: Seconds the requests in flight get to finish after a stop (``batchrun run --grace``).
GRACE_S = 30.0
#: Seconds between two reads of the control plane while the lifecycle waits for the endpoint.
POLL_INTERVAL_S = 1.0
#: Seconds an endpoint may take to become ready (``endpoint.ready_timeout``).
READY_TIMEOUT_S = 20 * 60.0
#: Seconds of idleness before the endpoint scales itself to zero while a job runs (``endpoint.idle_backstop``).
IDLE_BACKSTOP_S = 15 * 60.0
#: Seconds one check of a server may take: its health route during the ready wait, ``GET /info``.
CHECK_TIMEOUT_S = 10.0
#: The largest answer to a check that is read (``/info`` is a few hundred bytes).
CHECK_MAX_BYTES = 2**20
