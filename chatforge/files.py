"""File permissions of what chatforge writes.

Files written through a temporary name (``tempfile.mkstemp``) or by libraries that create them
private (safetensors) get mode 0600; every file chatforge writes should instead get the mode a
plain ``open(path, "w")`` gives under the user's umask, so that a model directory is shared the
way the user's other files are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def umask_file_mode() -> int:
    """The mode of a new file under this process's umask: ``0o666 & ~umask``."""
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it ...
    os.umask(mask)  # ... and put it back at once
    return 0o666 & ~mask


def set_umask_mode(path: Union[str, Path]) -> None:
    """Give an existing file the mode a new file gets under the umask (see :func:`umask_file_mode`)."""
    os.chmod(path, umask_file_mode())
