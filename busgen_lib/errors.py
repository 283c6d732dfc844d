"""The two kinds of failure a user can cause, so the CLI can answer each in one line.

Library code raises these where the input is at fault; `cli.main` prints
`busgen: error: <message>` and exits 2 (usage) or 1 (data) without a traceback
unless `--debug` or BUSGEN_DEBUG=1 asks for it.
"""

from __future__ import annotations


class BusgenError(Exception):
    """A problem with what the user gave us (not a bug): the message names where and how to fix it."""

    exit_code = 1


class UsageError(BusgenError, ValueError):
    """An option or combination of options that cannot work (exit status 2)."""

    exit_code = 2


class DataError(BusgenError, ValueError):
    """A file, row or field of the user's data that cannot be used (exit status 1)."""

    exit_code = 1
