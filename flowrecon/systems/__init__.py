"""Physical systems that plug into the generic flowrecon core."""
