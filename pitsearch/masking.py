"""Passwords never reach a terminal, a log, an MLflow param / tag / artifact or a trial attribute: everything
that prints or stores a URL or a config passes through here. (Credentials belong in the URL or, better, the
environment: PGPASSWORD / ~/.pgpass for PostgreSQL, MLFLOW_TRACKING_USERNAME / _PASSWORD for MLflow.)"""

from __future__ import annotations

import re
from typing import Any

# scheme://user:password@host -> scheme://user:***@host ; ...?password=x -> ...?password=***
# Hydra escapes colons in the overrides it records and logs with -m (`http\://user\:password@host`): the
# optional backslashes catch that form too.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*\\?://[^\s:/?#@\\]*\\?:)(?P<secret>[^\s/?#]*)@")
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|token)=)[^&#\s]*", re.IGNORECASE)


def mask_url(url: Any) -> str:
    """A URL (or any text holding URLs) with each password replaced by `***`."""
    text = _USERINFO.sub(lambda m: f"{m['head']}***@", str(url))
    return _QUERY.sub(lambda m: f"{m['head']}***", text)


def mask_secrets(value: Any) -> Any:
    """`mask_url` applied to every string inside a (nested) dict / list; other values are returned as they are."""
    if isinstance(value, str):
        return mask_url(value) if "://" in value or "=" in value else value
    if isinstance(value, dict):
        return {k: mask_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_secrets(v) for v in value)
    return value
