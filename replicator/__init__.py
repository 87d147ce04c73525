"""drctl replicator: ships block deltas of protected volumes to a target daemon."""
