"""Write a checkpoint directory so that a crash never leaves a half-written one in its place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(directory: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yields an empty staging directory beside `directory`; when the block finishes it becomes `directory`.

    If the block raises, the staging directory is removed and `directory` is untouched. With `overwrite`, an
    existing `directory` is moved aside until the new one is in place, then deleted.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if os.path.exists(directory):
        previous = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rename(directory, os.path.join(previous, name))
    os.rename(staging, directory)
    if previous is not None:
        shutil.rmtree(previous)
