"""The training loop and data-parallel helpers."""
