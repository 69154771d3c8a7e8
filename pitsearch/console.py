"""The one Rich console factory of the command-line tools (progress lines, tables, links): plain text, no markup."""

from __future__ import annotations

import os
import sys

# Rich wraps at 80 columns when its stream is not a terminal, and sweep workers usually write to log files (nohup,
# SLURM, ssh > log): tables get this width there, and plain lines are never wrapped (soft_wrap), so an MLflow link
# or an epoch line stays one line to read, grep and copy.
LOG_FILE_WIDTH = 160


def make_console(stderr: bool = True):
    from rich.console import Console

    class _PlainConsole(Console):
        """Strings are masked (a URL's password) before printing: what reaches a terminal or a log is safe."""

        def print(self, *objects, **kwargs):
            from pitsearch.masking import mask_url

            super().print(*(mask_url(o) if isinstance(o, str) else o for o in objects), **kwargs)

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else LOG_FILE_WIDTH
    # Every line printed here carries text pitsearch does not control (failure reasons holding paths in brackets,
    # exception messages, variants like "[1, 2, 1]"): markup would crash on "[/path ...]" (MarkupError) and
    # silently drop "[bold]"-like words, so strings are printed verbatim and uncoloured. Styling is explicit
    # (Text / Table / Progress objects), never parsed out of a message.
    return _PlainConsole(stderr=stderr, width=width, soft_wrap=True, markup=False, highlight=False)
