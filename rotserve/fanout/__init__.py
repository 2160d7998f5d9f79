"""The fan-out every job runs on: engine actors on Ray pull deterministic shards of a plan, and
the driver publishes each shard's table once as a Parquet part; resumable, exactly once.

    job = Job(name, actor_prefix, plan, store, worker=MyWorker, worker_spec=..., options=...)
    attempt = run_attempt(job, manifest, state, t0)
"""

from rotserve.fanout.cluster import Placement
from rotserve.fanout.driver import FanOutStats, Plan
from rotserve.fanout.engines import EngineSpec, PlaneFile, engine_spec, make_engine
from rotserve.fanout.errors import ExecutionConfigError, FanOutError
from rotserve.fanout.job import Attempt, Job, run_attempt
from rotserve.fanout.options import ExecutionOptions
from rotserve.fanout.provenance import now, provenance
from rotserve.fanout.store import PartStore
from rotserve.fanout.worker import Worker

__all__ = [
    "Attempt",
    "EngineSpec",
    "ExecutionConfigError",
    "ExecutionOptions",
    "FanOutError",
    "FanOutStats",
    "Job",
    "PartStore",
    "Placement",
    "Plan",
    "PlaneFile",
    "Worker",
    "engine_spec",
    "make_engine",
    "now",
    "provenance",
    "run_attempt",
]
