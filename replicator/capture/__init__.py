"""Live write capture: the source serves the volume over NBD and knows every changed block."""
