"""drctl failover: etcd-backed coordination, the failover state machine, DNS rewriting."""
