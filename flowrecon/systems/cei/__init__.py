"""Coulomb explosion imaging of OCS: constants, physics, frames, simulator, data."""
