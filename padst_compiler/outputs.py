"""How padst commands read and write files: one-line errors, atomic writes, and never over
anything padst did not write.

Reading: ``read_text`` and ``read_json`` turn a missing, unreadable, non-UTF-8 or invalid file
into a ``PathError`` whose message names it (the command line prints it as its one error line).

Writing: every file goes to a temporary file beside it (``.NAME.*.padst-tmp``) and is moved
over its name with ``os.replace``, so a killed command leaves the old file or the new one,
never half of one.

Ownership: ``check_file`` refuses an output file that exists and is not an earlier result of
the same command; ``claim_directory`` refuses an output folder that holds anything its
command does not write, or that another command (or no padst command) made. A folder padst
creates, or finds empty, gets a ``.padst-output`` file naming the command.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

MARKER = ".padst-output"
TEMP_SUFFIX = ".padst-tmp"


class PathError(ValueError):
    """A file or folder a command cannot read, or must not write."""


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def read_text(path: str | Path) -> str:
    """The UTF-8 text of the file ``path``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PathError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PathError(f"{path} is a directory, not a file") from None
    except OSError as error:
        raise PathError(f"cannot read {path}: {_reason(error)}") from None
    except UnicodeDecodeError:
        raise PathError(f"{path} is not a UTF-8 text file") from None


def read_json(path: str | Path):
    """The JSON value in the file ``path``."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise PathError(f"{path} is not valid JSON ({error.msg}, line {error.lineno} column {error.colno}); "
                        "a truncated file?") from None


def list_dir(path: str | Path) -> set[str]:
    """The names in the folder ``path``."""
    try:
        return {entry.name for entry in Path(path).iterdir()}
    except OSError as error:
        raise PathError(f"cannot read the folder {path}: {_reason(error)}") from None


@contextmanager
def atomic_open(path: str | Path, binary: bool = False) -> Iterator[IO]:
    """A file to write ``path`` through: it replaces ``path`` only once the block ends without
    an exception (created with the usual permissions: ``os.open`` applies the umask)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(handle, "wb" if binary else "w", encoding=None if binary else "utf-8") as file:
            yield file
        os.replace(temp, path)
    except OSError as error:
        raise PathError(f"cannot write {path}: {_reason(error)}") from None
    finally:
        temp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as file:
        file.write(text)
    return Path(path)


def write_json(path: str | Path, value) -> Path:
    return write_text(path, json.dumps(value, indent=2))


def save_figure(figure, path: str | Path, **options) -> Path:
    """Save a matplotlib figure atomically, in the format its file name ends with."""
    with atomic_open(path, binary=True) as file:
        figure.savefig(file, format=Path(path).suffix[1:] or None, **options)
    return Path(path)


def json_with_keys(keys: Iterable[str]) -> Callable[[str], bool]:
    """Tells a JSON result by its keys: an object with exactly ``keys``, or a non-empty list of
    such objects (one per row)."""
    wanted = set(keys)

    def recognise(text: str) -> bool:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        rows = value if isinstance(value, list) and value else [value]
        return all(isinstance(row, dict) and set(row) == wanted for row in rows)

    return recognise


def check_file(path: str | Path, what: str, recognise: Callable[[str], bool]) -> None:
    """Refuse, before any work, an output file a command cannot write or must not overwrite:
    a directory, one in a missing or read-only folder, or one that exists and that
    ``recognise`` (given its text) does not take for ``what`` the command writes (an earlier
    result of the same kind)."""
    path = Path(path)
    if path.is_dir():
        raise PathError(f"{path} is a directory: give a file name")
    if not path.parent.is_dir():
        raise PathError(f"cannot write {path}: there is no folder {path.parent}")
    if not os.access(path.parent, os.W_OK):
        raise PathError(f"cannot write {path}: the folder {path.parent} is read-only")
    if path.exists() and not recognise(_read_lenient(path)):
        raise PathError(f"{path} exists and is not {what}: choose another file or remove it")


def _read_lenient(path: Path) -> str:
    """The text of ``path`` with undecodable bytes replaced: enough to tell what wrote it."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as error:
        raise PathError(f"cannot read {path}: {_reason(error)}") from None


def claim_directory(path: str | Path, command: str, names: Iterable[str],
                    adopt: Callable[[set[str]], bool] = lambda entries: False) -> Path:
    """The output folder ``path`` of ``command``, which writes only ``names`` in it (files or
    folders it may then replace). Created with the marker file if missing; an existing one
    must hold nothing but ``names`` and be empty, carry ``command``'s marker, or be one that
    ``adopt`` (given the names in it) takes for an output of ``command`` older than markers."""
    path = Path(path)
    if not path.exists():
        try:
            path.mkdir(parents=True)
        except OSError as error:
            raise PathError(f"cannot create the folder {path}: {_reason(error)}") from None
    elif not path.is_dir():
        raise PathError(f"{path} exists and is not a directory")
    entries = {name for name in list_dir(path) if not name.endswith(TEMP_SUFFIX)}  # a killed write's leftovers
    owner = _read_lenient(path / MARKER).strip() if MARKER in entries else None
    entries.discard(MARKER)
    if owner not in (None, command):
        raise PathError(f"{path} was written by {owner[:40]!r}, not by {command}: choose another folder")
    foreign = sorted(entries - set(names))
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PathError(f"{path} holds {listed}, which {command} does not write: choose another folder")
    if owner is None and entries and not adopt(entries):
        raise PathError(f"{path} is not empty and was not written by {command} (it has no {MARKER} file): "
                        "choose another folder")
    if owner is None and not entries:
        write_text(path / MARKER, command + "\n")
    return path
