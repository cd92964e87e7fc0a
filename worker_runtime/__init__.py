"""What prefill and decode workers share: the Worker service's common part, wire conversion between
protos and the engine's types, metrics, KV events, settings, and the server that hosts a role."""
