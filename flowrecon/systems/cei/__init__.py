"""Coulomb explosion imaging of any molecule: the CEI system (`make_system`), molecules,
simulators, frames, physics, data and refinement."""

from flowrecon.systems.cei.system import make_system

__all__ = ["make_system"]
