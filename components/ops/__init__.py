"""Light CPU components that wire the stage components together (no GPU, no model)."""
