"""The two kinds of failure a user can cause, so the CLI can answer each in one line.

Library code raises these where the input is at fault; `cli.main` prints
`busgen: error: <message>` and exits 2 (usage) or 1 (data) without a traceback
unless `--debug` or BUSGEN_DEBUG=1 asks for it.
"""

from __future__ import annotations


class BusgenError(Exception):
    """A problem with what the user gave us (not a bug): the message names where and how to fix it."""

    exit_code = 1

    def one_line(self) -> str:
        """The message as the CLI prints it: one line (multi-line details are for library callers)."""
        lines = [line.strip() for line in str(self).splitlines() if line.strip()]
        if len(lines) <= 1:
            return lines[0] if lines else type(self).__name__
        return f"{lines[0]} (and {len(lines) - 1} more line(s); run with --debug to see them all)"


class UsageError(BusgenError, ValueError):
    """An option or combination of options that cannot work (exit status 2)."""

    exit_code = 2


class DataError(BusgenError, ValueError):
    """A file, row or field of the user's data that cannot be used (exit status 1)."""

    exit_code = 1
