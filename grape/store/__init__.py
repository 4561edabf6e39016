"""The one typed access layer to what lives in Redis. Every process reaches the data through it.

- `io`: plans (one implementation of each read, driven by a sync or an asyncio client) and Lua calls;
  the docstring there says why.
- `datasets`: a dataset's metadata, counters, per-task progress, items and pages of scored items, and the
  selection by any strategy (the strategy checked once).
- `scoring`: the gateway <-> worker protocol: ingest, results and hand-back scripts with their builders.
- `jobqueue`: the job queues of trainers (training jobs) and evaluators (evaluations): one protocol, two
  key spaces.
- `consumer`: the loop a trainer or an evaluator runs over its queue (claim, heartbeat, reap, end).
- `experiments`: an experiment's record, its arms' stored selections, the active set, the driver's lock.
- `logs`: pages of a job's or an evaluation's log stream.
- `heartbeats`: who is alive (workers, trainers, evaluators).
- `errors`: what the store raises (`NotFound`, `Invalid`, `Conflict`).

The key layout itself is `grape.keys`.
"""
