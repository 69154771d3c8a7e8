"""The one parser of `sqlite:///<path>` URLs (MLflow stores and Optuna storages alike). Light: no imports
beyond the standard library, so config errors stay fast."""

from __future__ import annotations

from pathlib import Path


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///path` (or `sqlite+driver:///path`) URL, query string dropped; None for any other
    URL, and for an in-memory or URI-style (`file:`) database, which have no file pitsearch can check."""
    scheme, sep, rest = str(url).partition(":///")
    if not sep or scheme.split("+")[0] != "sqlite":
        return None
    path = rest.split("?")[0]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


def with_sqlite_path(url: str, path: Path) -> str:
    """`url` with its file replaced by `path` (scheme, driver and query kept)."""
    scheme, _, rest = str(url).partition(":///")
    _, qmark, query = rest.partition("?")
    return f"{scheme}:///{path}{qmark}{query}"
