"""losses layer of nemotron-jax (see DESIGN.md)."""
