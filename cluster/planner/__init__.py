"""The SLO planner: an autoscaler that sizes the prefill and the decode pool independently.

Each interval (cluster.planner.loop) it observes the cluster (cluster.planner.sources: latency
quantiles and load over a window, from Prometheus or the router's own /metrics), asks the policy
(cluster.planner.policy) how many workers each pool needs to meet its latency target (TTFT for
prefill, ITL for decode) given a measured capacity profile (cluster.planner.capacity, written by
`tandem profile`: cluster.planner.profiler), and applies the answer through an actuator
(cluster.planner.actuator: the interface and Kubernetes; cluster.planner.local_actuator: the
worker processes of `tandem up`). Every decision is logged and counted (cluster.planner.metrics).
"""
