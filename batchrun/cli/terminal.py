"""What the command says on the terminal: messages on stderr, stdout that a closed pipe does not break,
and logging with every registered secret scrubbed."""

from __future__ import annotations

import logging
import sys
from typing import Any

from batchrun.errors import redact


class RedactingFilter(logging.Filter):
    """Scrubs registered secrets from every log record, whatever logger produced it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def setup_logging(verbose: int) -> None:
    """Log to stderr: warnings, or events with -v, or everything with -vv; secrets scrubbed."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def echo(message: str) -> None:
    """Say something to the person at the terminal (stderr, so stdout stays the command's output)."""
    print(redact(message), file=sys.stderr, flush=True)


class QuietPipe:
    """``sys.stdout`` for the length of a command. Once its reader has gone (``batchrun status | head``),
    the rest of the output is dropped without a word, as Unix tools do, and the command ends with its
    own exit code (a BrokenPipeError is not a failure of the job, and compare's verdict still counts)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return int(self._stream.write(text))
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        # What is still buffered, and whatever the interpreter flushes on the way out, goes to /dev/null.
        import os

        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # a stream with no descriptor (a test's capture)
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
