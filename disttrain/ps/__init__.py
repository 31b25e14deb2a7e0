"""Parameter-server data parallelism: servers hold parameter shards and apply the
optimizer; workers pull, compute gradients and push, under a staleness bound.

Modules: ``protocol`` (wire format, shard plan, flat buffers), ``gate`` (when a worker may
start computing: the staleness bound), ``update`` (the step being formed under s >= 1),
``rounds`` (when that step closes and when a pull waits for it), ``hold`` (a straggler by
construction, tests), ``stats`` (staleness and throughput counters), ``server``, ``worker``,
``free_worker`` (a worker's whole run).
The Strategy that ties them to the training loop is ``disttrain.strategies.param_server``.
"""
