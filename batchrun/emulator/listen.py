"""Opening a loopback port for one of the emulator's aiohttp applications, with a one-line error when it cannot."""

from __future__ import annotations

import errno

from aiohttp import web

from batchrun.errors import EmulatorError


async def listen(runner: web.AppRunner, host: str, port: int, *, what: str, advice: str) -> int:
    """Serve ``runner`` on ``host:port`` and return the bound port (``port`` 0 picks a free one).

    A busy port or any other bind failure raises EmulatorError: ``what`` names the listener (prefix of
    the message, may be empty), ``advice`` says how to pick another port.
    """
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            problem = f"port {port} on {host} is already in use; {advice}"
        else:
            problem = f"cannot listen on port {port} of {host}: {error.strerror or error}"
        raise EmulatorError(f"{what}{problem}") from None
    return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
