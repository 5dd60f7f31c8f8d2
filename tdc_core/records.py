"""Small JSON records (pydantic models) written atomically and read back with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from tdc_core.atomic import atomic_write_bytes
from tdc_core.errors import DataError

__all__ = ["load_record", "save_record"]

M = TypeVar("M", bound=BaseModel)


def save_record(path: str | Path, record: BaseModel) -> Path:
    """Write ``record`` as indented JSON, atomically; returns the path.

    Raises:
        WriteError: the file could not be written (names it and the OS reason); a previous
            version of the file is left as it was.
    """
    atomic_write_bytes(path, record.model_dump_json(indent=1).encode())
    return Path(path)


def load_record(path: str | Path, cls: type[M], *, what: str) -> M:
    """Read a ``cls`` record from JSON.

    Raises:
        DataError: missing, unreadable or invalid file; the message names ``what`` and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        return cls.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise DataError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise DataError(f"{what} {path} is corrupt or invalid: {where + ': ' if where else ''}"
                        f"{err['msg'].removeprefix('Value error, ')}") from None
