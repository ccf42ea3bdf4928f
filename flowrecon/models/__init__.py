"""Backend adapters, one file per library."""
