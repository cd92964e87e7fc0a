"""Tensor parallelism inside one engine (Megatron-style): one OS process per rank, rank 0 the engine itself.

Rank 0 schedules, samples and owns the only scheduler and block manager; ranks 1..N-1 (engine.tp_follower)
hold a shard of every layer and a KV pool of their own KV heads, in which every block id means what it means in
rank 0's pool, and run each forward rank 0 sends them (engine.parallel.leader). The ranks meet in collectives of
a torch.distributed process group (Gloo on CPU, NCCL on CUDA): an all-reduce after each attention and MLP, one
for the vocabulary-split embedding, and a gather of the vocabulary-split logits to rank 0.
"""
