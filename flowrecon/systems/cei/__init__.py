"""Coulomb explosion imaging: molecules, simulators, frames, physics, data and refinement."""
