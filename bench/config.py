"""How big each measurement is: full (``make bench``), quick (about 10 minutes; 2 without the
steady and xmin sections) and smoke."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from bench.systems.base import Variant

SECTIONS = ("processing", "latency", "enqueue", "growth", "flow", "requests", "steady", "xmin")

# The load of the steady and xmin sections, the same in every mode (the rows' titles name it):
# jobs per second in fixed-rate mode, jobs kept waiting in target-depth mode; and the rate and
# concurrency under which the xmin section holds a snapshot.
STEADY_RATE = 1_000.0
STEADY_DEPTH = 4_000
XMIN_RATE = 800.0
XMIN_CONCURRENCY = 16


@dataclass(frozen=True)
class Config:
    mode: str
    repeat: int = 3
    # Processing: no-op jobs pre-filled per run (times each variant's jobs_factor).
    jobs: int = 20_000
    # Worker processes for pgoutbox's scaling rows (1 and 2 are also the peers' columns).
    scaling: tuple[int, ...] = (1, 2, 4)
    # Whether peers are also measured with 2 worker processes (quick mode skips it).
    peer_scaling: bool = True
    # Whether arq and celery may join (when Redis answers); quick mode leaves them out.
    redis_peers: bool = True
    # Concurrency of pgoutbox's worker, which is also where its peak RSS is read.
    concurrency: int = 100
    latency_jobs: int = 300
    latency_rate: float = 50.0
    latency_idle: float = 1.0  # seconds the worker sits idle before the first job
    enqueue_single: int = 5_000
    enqueue_batch: int = 20_000
    growth_finished: int = 1_000_000
    growth_future: int = 100_000
    http_seconds: float = 8.0
    http_warmup: float = 1.5
    http_concurrency: int = 16
    # Steady load, worker and producer in one process: the concurrencies, then seconds of
    # warm-up and of measurement per run.
    steady_concurrency: tuple[int, ...] = (10, 16, 64, 256)
    steady_warmup: float = 2.0
    steady_seconds: float = 10.0
    # A snapshot held under steady load (one repetition whatever ``repeat`` says): seconds
    # of warm-up, baseline, hold and recovery; the sampling window; and the span the
    # figures "at the end of the hold" and "after the release" cover.
    xmin_warmup: float = 2.0
    xmin_baseline: float = 60.0
    xmin_hold: float = 600.0
    xmin_recovery: float = 120.0
    xmin_window: float = 5.0
    xmin_span: float = 60.0
    sections: tuple[str, ...] = SECTIONS
    systems: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = field(default_factory=tuple)


FULL = Config(mode="full")
# About 2 minutes: smaller runs, the PostgreSQL peers only and with one worker process, and
# a history of 200,000 + 20,000 rows instead of 1.1 million for the cost-growth rows; the
# steady and xmin sections add about 7 minutes (fewer concurrencies, a one-minute hold).
QUICK = Config(
    mode="quick",
    jobs=3_000,
    scaling=(1, 2),
    peer_scaling=False,
    redis_peers=False,
    latency_jobs=50,
    latency_idle=0.5,
    enqueue_single=500,
    enqueue_batch=5_000,
    growth_finished=200_000,
    growth_future=20_000,
    http_seconds=2.0,
    http_warmup=0.5,
    steady_concurrency=(10, 64),
    steady_warmup=1.0,
    steady_seconds=3.0,
    xmin_warmup=1.0,
    xmin_baseline=15.0,
    xmin_hold=60.0,
    xmin_recovery=30.0,
    xmin_span=15.0,
)
SMOKE = Config(
    mode="smoke",
    repeat=1,
    jobs=200,
    scaling=(1, 2),
    latency_jobs=20,
    latency_rate=50.0,
    latency_idle=0.3,
    enqueue_single=100,
    enqueue_batch=2_000,
    growth_finished=2_000,
    growth_future=200,
    http_seconds=1.0,
    http_warmup=0.3,
    http_concurrency=4,
    steady_concurrency=(10,),
    steady_warmup=0.3,
    steady_seconds=1.0,
    xmin_warmup=0.3,
    xmin_baseline=1.0,
    xmin_hold=3.0,
    xmin_recovery=2.0,
    xmin_window=0.5,
    xmin_span=1.0,
)
MODES = {"full": FULL, "quick": QUICK, "smoke": SMOKE}

# Each peer with its documented fast settings and with its defaults.
VARIANTS = (
    Variant("pgoutbox", "pgoutbox", {"concurrency": 100}, workers=(1, 2, 4), steady=True),
    Variant("raw", "raw SQL", {"loops": 2, "batch_size": 100}, jobs_factor=3.0, steady=True),
    Variant(
        "pgqueuer",
        "pgqueuer b=100",
        {"batch_size": 100},
        workers=(1,),
        latency=False,
        enqueue=False,
        steady=True,
    ),
    Variant("pgqueuer", "pgqueuer b=10", {"batch_size": 10}),
    Variant("procrastinate", "procrastinate c=50", {"concurrency": 50}, jobs_factor=0.2),
    Variant("arq", "arq", {"concurrency": 50}, jobs_factor=0.25),
    Variant("celery", "celery", {"concurrency": 2}, jobs_factor=0.15),
)


def configure(mode: str, systems: tuple[str, ...], sections: tuple[str, ...]) -> Config:
    base = MODES[mode]
    variants = tuple(v for v in VARIANTS if not systems or v.system in systems)
    if base.mode == "smoke":
        # Keep every run long enough to see, whatever the factor.
        variants = tuple(replace(v, jobs_factor=1.0) for v in variants)
    return replace(base, systems=systems, sections=sections, variants=variants)
