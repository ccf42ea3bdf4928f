"""Lennard-Jones fluid under gravity."""
