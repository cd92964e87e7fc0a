"""A simulated engine: the real scheduler, block manager, prefix cache, KV events and sampler, with the
model's forward replaced by a timing model measured on real hardware (`SimulationProfile`) and a
deterministic next-token function. It lets a worker process (`tandem worker --simulate PROFILE`) stand in
for a GPU worker when measuring the control plane at hundreds of workers on one machine."""
