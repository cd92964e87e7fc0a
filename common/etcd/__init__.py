"""etcd: access (TLS, auth), the client, leased keys, and a local server for launchers and tests."""
