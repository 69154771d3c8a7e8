"""The one Rich console factory of the command-line tools (progress lines, tables, links)."""

from __future__ import annotations

import os
import sys

# Rich wraps at 80 columns when its stream is not a terminal, and sweep workers usually write to log files (nohup,
# SLURM, ssh > log): tables get this width there, and plain lines are never wrapped (soft_wrap), so an MLflow link
# or an epoch line stays one line to read, grep and copy.
LOG_FILE_WIDTH = 160


def make_console(stderr: bool = True):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else LOG_FILE_WIDTH
    return Console(stderr=stderr, width=width, soft_wrap=True)
