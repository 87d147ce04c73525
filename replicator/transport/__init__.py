"""gRPC transport of the replicator. ``wire`` is the only module that imports generated code."""
