"""The site layer: the one place that composes replication (replicator/) and failover
(failover/). A site agent runs, for each service, the data path its role needs (target
daemon for replicas, capture export and push for primaries), promotes and demotes volumes as
the failover records say, and re-protects after a failover by shipping only the blocks that
diverged (dataplane.py, divergence.py, agent.py)."""
