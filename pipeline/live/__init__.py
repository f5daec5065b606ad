"""The live path: a frame's way from a growing scan file to a worker and back to its store.

watch (new files) -> follow (complete frames) -> session (one scan) -> dispatch + wire (ZeroMQ)
-> worker (the models) -> dispatch -> sink (results into the store) ; daemon wires them together,
control answers `pipeline status`, security keeps strangers out, metrics serves Prometheus.
"""
