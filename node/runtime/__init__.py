"""The node's long-running parts: the process (:mod:`~node.runtime.service`), the storage
SCP's ingest and spool, study assembly, the scheduler's chores, the model host, the worker
and its pipeline, the output objects and the delivery worker."""
