"""Reading the files flowrecon writes with ``torch.save``: one-line errors, never code.

`read_state` opens a file with ``torch.load(weights_only=True)`` (tensors and plain
values only, so a crafted file cannot run code) and turns every way it can fail into a
one-line ``ValueError`` that names the file, instead of PyTorch's multi-paragraph
messages (with terminal colour codes and the advice to set ``weights_only=False``, which
a user must not follow for a file of unknown origin).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch


def read_state(path: str | os.PathLike, fmt: str, what: str) -> dict[str, Any]:
    """The dict saved in ``path``, checked to carry ``state["format"] == fmt``.

    Args:
        path: The file.
        fmt: The ``format`` entry the file must have (e.g. ``"flowrecon.Density"``).
        what: How the error messages name the expected file (e.g. ``"flowrecon model file"``).

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: The file is unreadable, holds other objects, or is another format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a pickled class or function: never ours
            raise ValueError(
                f"{path} is not a {what}: it holds Python objects other than tensors and "
                "plain values, which flowrecon never writes; refused to load it"
            ) from None
        raise ValueError(
            f"{path} is not a {what}: not a readable PyTorch file (damaged, truncated or "
            "another kind of file)"
        ) from None
    except Exception:
        raise ValueError(
            f"{path} is not a {what}: not a readable PyTorch file (damaged, truncated or "
            "another kind of file)"
        ) from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"{path} is not a {what}")
    return state
