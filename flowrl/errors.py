"""User-facing errors.

Anything a user can cause (a bad config key, a corrupt dataset, an unknown task) raises
:class:`FlowrlError` with one line naming the problem. The CLI prints it and exits with code 2;
library callers can catch it. Internal bugs stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class FlowrlError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code = 2


class Interrupted(FlowrlError):
    """Training stopped by Ctrl-C after saving a checkpoint."""

    exit_code = 130
