"""Declarative DR runbooks: one YAML file per deployment, validated with errors that name file,
line and field, and turned into the exact steps a failover runs."""
