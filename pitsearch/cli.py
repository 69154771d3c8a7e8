"""The one way out of every command-line tool (`python -m pitsearch`, `pitsearch.report`, `pitsearch.export`).

A known failure is one line on stderr, `error: <field or path>: <problem>`, with passwords masked, and an exit
status a script can act on:

    2    bad input: a config value, an override, a sweep file, a path that cannot be written
    3    a lost server (database or MLflow): the worker already recorded what it could
    4    a sweep that ended with failed cells or trials left (its last line says which; rerun to retry them)
    130  Ctrl-C (128 + SIGINT, what a shell reports for an interrupted command)
    141  the reader of stdout went away (`--help | head`), silently

Anything else is a bug: its traceback is printed (masked too) and the status is 1.

Classes are looked up lazily (`sys.modules`): an exception of a module that was never imported cannot have been
raised, and `--help` or an override typo must not pay for importing torch, mlflow or optuna.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable

EXIT_BAD_INPUT = 2
EXIT_SERVICE_UNAVAILABLE = 3
# A sweep that ended with failed cells or trials left (nothing running): its last line says which and why.
EXIT_TRIALS_FAILED = 4
EXIT_INTERRUPTED = 130


def guarded(fn: Callable[..., Any], *args: Any) -> int:
    """`fn(*args)`; a failure becomes one printed line and its exit status. Returns fn's int result, else 0.
    `SystemExit` passes through (a caller that already said why chose its status)."""
    try:
        result = fn(*args)
    except KeyboardInterrupt:
        print_line("interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read our output went away (`--help | head`): nothing to report; Python would print a traceback
        # when flushing stdout at exit unless stdout goes somewhere. 141 = 128 + SIGPIPE, as `cat` exits.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as error:  # noqa: BLE001 - every failure ends here, known or not
        known = known_failure(error)
        if known is None:
            import traceback

            print_line("".join(traceback.format_exception(error)).rstrip("\n"), one_line=False)
            return 1
        print_line(f"error: {known[1]}")
        return known[0]
    return result if isinstance(result, int) else 0


def print_line(text: str, one_line: bool = True) -> None:
    """Plain stderr, never Rich: nothing in a message (a path in brackets, a `[bold]`) is read as markup."""
    from pitsearch.masking import mask_url

    text = mask_url(text)
    if one_line:
        text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    print(text, file=sys.stderr, flush=True)


def known_failure(error: BaseException) -> tuple[int, str] | None:
    """(exit status, `<field or path>: <problem>`) for a failure users cause or meet; None for a bug."""
    from pitsearch.errors import ConfigError
    from pitsearch.retry import ServiceUnavailable

    if isinstance(error, ConfigError):
        return EXIT_BAD_INPUT, str(error)
    worker = sys.modules.get("pitsearch.search.worker")
    if isinstance(error, ServiceUnavailable) or (worker is not None and isinstance(error, worker.WorkerAbort)):
        return EXIT_SERVICE_UNAVAILABLE, str(error)
    hydra_errors = sys.modules.get("hydra.errors")
    if hydra_errors is not None and isinstance(error, hydra_errors.HydraException):  # before OSError: see below
        return EXIT_BAD_INPUT, _hydra_problem(error, hydra_errors)
    omegaconf_errors = sys.modules.get("omegaconf.errors")
    if omegaconf_errors is not None and isinstance(error, omegaconf_errors.OmegaConfBaseException):
        if _is_schema_error(error):
            from pitsearch.config.check import problem

            return EXIT_BAD_INPUT, ": ".join(problem(error))
        return EXIT_BAD_INPUT, f"{error.full_key or 'config'}: {_first_line(error.msg or error)}"
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        context = f" ({error.context})" if error.context else ""
        return EXIT_BAD_INPUT, f"{mark.name}: line {mark.line + 1}, column {mark.column + 1}: {error.problem}{context}"
    if isinstance(error, OSError) and error.filename is not None:
        # A folder that cannot be made or a file that cannot be written (read-only, not a folder, /proc, ...).
        path = os.path.abspath(os.fsdecode(error.filename))
        return EXIT_BAD_INPUT, f"{path}: {error.strerror or error}"
    return None


def _hydra_problem(error: Exception, hydra_errors) -> str:
    """Hydra's multi-line messages (option lists, search paths, grammar links) as one line naming the field.
    (MissingConfigException is also an OSError, hence checked before OSError.)"""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, hydra_errors.OverrideParseException):
        return f"{error.override}: cannot parse this override ({lines[0]})"
    if isinstance(error, hydra_errors.MissingConfigException):
        missing = error.missing_cfg_file or ""
        if error.options is not None and "/" in missing:   # a group option that does not exist
            group, name = missing.rsplit("/", 1)
            where = re.match(r"In '([^']+)'", lines[0])
            asked = f" (asked for in {where.group(1)})" if where and where.group(1) != "config" else ""
            return f"{group}: no option {name!r}{asked}; available: {', '.join(error.options) or 'none'}"
        if lines and lines[0].startswith("Cannot find primary config"):
            return f"--config-name: {lines[0]}"
    cause = error.__cause__
    key = re.search(r"'([^']+)'", lines[0]) if lines else None
    field = key.group(1) if key else "config"
    if lines and lines[0].startswith("Could not override") and type(cause).__name__ in ("ConfigKeyError",
                                                                                     "ConfigAttributeError"):
        schema = getattr(cause, "object_type", None)
        if hasattr(schema, "__dataclass_fields__"):   # a typed node (pitsearch.config.schema): say what it takes
            return f"{field}: no such key in the config (valid: {', '.join(schema.__dataclass_fields__)})"
        hint = next((line for line in lines[1:] if line.startswith("To append")), "")
        return f"{field}: no such key in the config" + (f" ({hint[0].lower()}{hint[1:]})" if hint else "")
    detail = f" ({_first_line(cause)})" if cause is not None and str(cause).strip() else ""
    merging = re.match(r"Error merging override (?P<key>[^=\s]+)=(?P<value>.*)", lines[0]) if lines else None
    if merging and "Cannot merge DictConfig with ListConfig" in detail:
        # e.g. the list `sweep.seeds: [0, 1, 2]` of a sweep file given the adaptive mapping form
        key, value = merging["key"], merging["value"]
        return (f"{key}: a mapping cannot replace a list with `=`; delete the list first: "
                f"\"~{key}\" \"+{key}={value}\"")
    # A value the schema refuses, from an override or a config file ("In 'sweep/x': ValidationError raised while
    # composing config"; Hydra chains that one implicitly): the field, what it must be, what it got.
    schema_error = cause if cause is not None else error.__context__
    if _is_schema_error(schema_error):
        from pitsearch.config.check import problem

        where = re.match(r"In '([^']+)'", lines[0]) if lines else None
        field, text = problem(schema_error)
        return f"{field}: {text}" + (f" (in {where.group(1)})" if where else "")
    return f"{field}: {' '.join(lines) or type(error).__name__}{detail}"


def _is_schema_error(error: BaseException | None) -> bool:
    """An OmegaConf error on a node of pitsearch's schema: a wrong type, an unknown key, a missing value."""
    omegaconf_errors = sys.modules.get("omegaconf.errors")
    if omegaconf_errors is None or not isinstance(error, omegaconf_errors.OmegaConfBaseException):
        return False
    return (isinstance(error, omegaconf_errors.ValidationError) and bool(error.full_key)) or hasattr(
        error.object_type, "__dataclass_fields__")


def _first_line(value: Any) -> str:
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    return lines[0] if lines else type(value).__name__
