"""drctl replicator: ships block deltas of protected volumes from a source agent to a target daemon."""
