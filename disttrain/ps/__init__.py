"""Parameter-server data parallelism: servers hold parameter shards and apply the
optimizer; workers pull, compute gradients and push, under a staleness bound.

Modules: ``protocol`` (wire format, shard plan), ``gate`` (when a worker may start
computing), ``stats`` (staleness and throughput counters), ``server``, ``worker``.
The Strategy that ties them to the training loop is ``disttrain.strategies.param_server``.
"""
