"""Tandem on Ray: `tandem up --ray ADDRESS` runs the router, the pools and the KV stores as Ray actors
placed by resources, restarted and replaced on failure, and scaled by the SLO planner
(docs/deployment-ray.md).

  actor.py      ServerActor: one worker, the router or a KV store in the actor's process
  placement.py  where each actor goes (custom resources, GPUs, anywhere)
  fleet.py      ActorFleet: the driver's actors by component, kept at their counts; the planner's actuator
  launcher.py   `tandem up --ray`: the driver
"""
