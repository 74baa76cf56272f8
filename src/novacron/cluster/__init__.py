"""Cluster membership: bootstrap tokens and joins (CSR signed by the cluster CA), the node registry
(heartbeats under a lease, health, labels, maintenance), placement over the registry and drains by
live migration. See docs/cluster.md."""
