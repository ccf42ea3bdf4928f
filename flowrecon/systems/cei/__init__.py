"""Coulomb explosion imaging: the CEI system (`make_system`) and its physics."""

from flowrecon.systems.cei.system import make_system

__all__ = ["make_system"]
