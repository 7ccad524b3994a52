"""Parallelism: expert parallelism with all-to-all dispatch, LLEP planning, local process groups."""
