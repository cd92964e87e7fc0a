"""The bottom of Tandem's imports: what every part shares (settings from flags and the environment,
etcd client, leases and worker records, TLS and key files, gRPC wire helpers, process lifecycle).
It imports no other Tandem package."""
