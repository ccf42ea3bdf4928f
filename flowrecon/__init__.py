"""flowrecon: conditional generative models for inverse problems in physics.

Example:
    >>> import flowrecon as fr
    >>> "freia-cinn" in [m["name"] for m in fr.available_models()]
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["ConditionalGenerator", "available_models", "load", "make", "__version__"]

if TYPE_CHECKING:
    from flowrecon.base import ConditionalGenerator, load, make
    from flowrecon.registry import available_models


def __getattr__(name: str) -> Any:
    # torch and the backends load only when a model is made: `flowrecon models` stays fast.
    # Nothing at all loads with the package itself: `python -m flowrecon` installs its
    # signal handlers first, so a Ctrl-C while numpy loads exits 130 without a traceback.
    if name in ("ConditionalGenerator", "load", "make"):
        from flowrecon import base

        return getattr(base, name)
    if name == "available_models":
        from flowrecon.registry import available_models

        return available_models
    raise AttributeError(f"module 'flowrecon' has no attribute {name!r}")
