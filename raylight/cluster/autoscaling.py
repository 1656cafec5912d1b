"""SLO autoscaling of an engine pool, plugged into Ray Serve's autoscaler.

A pool (the colocated app's engine pool, or the disaggregated app's prefill or decode pool, each on its
own) scales on service-level targets when its `autoscaling_config` has an `slo` section; the other keys
are Serve's own (`min_replicas`, `max_replicas`, `initial_replicas`, `look_back_period_s`,
`metrics_interval_s`, `upscale_delay_s`, `downscale_delay_s`, `upscaling_factor`, ...):

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      look_back_period_s: 30       # the window every signal is measured over
      upscale_delay_s: 30          # a violation must last this long before replicas are added
      downscale_delay_s: 300       # the pool must stay well under target this long before one is removed
      slo:                         # SLOTargets below; at least one target
        ttft_p90_s: 2.0
        itl_p90_s: 0.1
        max_waiting_per_replica: 8
        max_kv_usage: 0.9

`serve_autoscaling_config` turns that into Serve's form: the `slo` section becomes
`policy: {policy_function: raylight.cluster.autoscaling:SLOPolicy, policy_kwargs: <the targets>}`.
Without `slo`, Serve's default policy (`target_ongoing_requests`) runs.

What each replica measures (`SLORecorder`, read by `EngineReplica.record_autoscaling_stats`, which Serve
calls every min(`look_back_period_s` / 5, `metrics_interval_s`) seconds, keeping the points of the last
`look_back_period_s`, and pushes to its controller every `metrics_interval_s`):

* TTFT: from the request's arrival at the replica (engine queue included) to its first token;
* ITL: time between consecutive token outputs of a request, divided by the tokens that output carried;
* both as counts per histogram bucket (`LATENCY_BUCKETS_S`) observed since the previous call, so the
  points Serve keeps for the window add up to exactly the samples of the window;
* `waiting`: requests accepted but not running (engine waiting queue and inbox); `kv_usage`: fraction of
  the KV blocks in use; `running`. Instantaneous values.

The pool's signals over the window (`pool_signals`), from Serve's raw per-replica series:

* `ttft_p90_s`, `itl_p90_s`: the 90th percentile of all replicas' samples pooled (one histogram, linear
  inside a bucket, as Prometheus' `histogram_quantile`); no signal with fewer than `min_samples` samples
  (no traffic is no evidence of slowness);
* `waiting_per_replica`: the sum over replicas of each one's mean waiting, plus requests queued in Serve's
  handles, divided by the running replicas;
* `kv_usage`: the mean over replicas of each one's mean.

Decision rule (`decide`; n = running replicas, t = Serve's current target). The pressure of a signal is
its value / its target; p = the largest over the configured targets that have a value.

* p > 1 (some target violated): want max(t, n + 1, min(ceil(n * p), max_scale_up_ratio * n)): a queue
  twice its target asks for twice the replicas, at most `max_scale_up_ratio` times as many at once.
* p * n / (n - 1) < `scale_down_below` and n == t (every signal well under target even with the load of
  one replica fewer spread over the others, and no scaling in flight): want t - 1. One replica at a time.
* otherwise, or when no replica has reported yet: hold at t.

Serve then applies its own parts: a want must persist for `upscale_delay_s` / `downscale_delay_s` before it
becomes the target ("violated for a while"; a want in the other direction, or a hold, restarts the clock),
`upscaling_factor` / `downscaling_factor`, and the min/max bounds. The band between `scale_down_below` and 1
is the hysteresis: a pool that just scaled up does not scale down until its load falls well below target.
A replica removed by a scale-down drains (Serve stops routing to it and waits for its running requests, up
to the app's `graceful_shutdown_timeout_s`; see `EngineReplica.drain_and_stop`).

Serve pickles this module by value into its controller; it imports nothing from raylight, so the controller
never loads the engine's modules (tests/unit/cluster/test_autoscaling.py checks the round trip).
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

logger = logging.getLogger("ray.serve")  # the controller's log: decisions show there

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                     3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0)  # upper bounds; one more bucket above the last
POLICY_PATH = "raylight.cluster.autoscaling:SLOPolicy"
_SIGNALS = (("ttft_p90_s", "ttft_p90_s"), ("itl_p90_s", "itl_p90_s"),
            ("waiting_per_replica", "max_waiting_per_replica"), ("kv_usage", "max_kv_usage"))


class SLOTargets(BaseModel):
    """The `slo` section of a pool's autoscaling_config: targets (any subset, at least one) and the rule's knobs."""

    model_config = ConfigDict(extra="forbid")

    ttft_p90_s: Optional[float] = Field(None, gt=0, description=(
        "Target 90th percentile of time to first token at the replicas (queueing included), seconds."))
    itl_p90_s: Optional[float] = Field(None, gt=0, description=(
        "Target 90th percentile of inter-token latency, seconds."))
    max_waiting_per_replica: Optional[float] = Field(None, gt=0, description=(
        "Target of requests waiting (accepted, not yet running) per replica, averaged over the window."))
    max_kv_usage: Optional[float] = Field(None, gt=0, le=1, description=(
        "Target fraction of KV cache blocks in use, the mean over replicas."))
    scale_down_below: float = Field(0.6, gt=0, lt=1, description=(
        "Remove a replica only when every signal times n/(n-1) is below this fraction of its target."))
    max_scale_up_ratio: float = Field(2.0, ge=1, description="At most this many times the replicas in one step.")
    min_samples: int = Field(5, ge=1, description="Latency samples in the window below which a p90 is no signal.")

    @model_validator(mode="after")
    def _some_target(self):
        if all(getattr(self, target) is None for _, target in _SIGNALS):
            raise ValueError("slo: set at least one of ttft_p90_s, itl_p90_s, max_waiting_per_replica, "
                             "max_kv_usage")
        return self


def serve_autoscaling_config(raw: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """A pool's autoscaling_config as Serve takes it: an `slo` section becomes the SLOPolicy with those
    targets. Validated (ours with pydantic, the rest with Serve's AutoscalingConfig when Ray is importable);
    a bad value raises ValueError naming `autoscaling_config.<field>`."""
    if not raw:
        return raw
    cfg = dict(raw)
    slo = cfg.pop("slo", None)
    if slo is not None:
        if "policy" in cfg:
            raise ValueError("autoscaling_config: give either `slo` or `policy`, not both")
        try:
            targets = slo if isinstance(slo, SLOTargets) else SLOTargets(**slo)
        except ValidationError as e:
            raise ValueError("autoscaling_config.slo: " + "; ".join(_problem(err) for err in e.errors())) from None
        except TypeError:
            raise ValueError(f"autoscaling_config.slo: a mapping of targets, not {slo!r}") from None
        cfg["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": targets.model_dump(exclude_none=True)}
    try:
        from ray.serve.config import AutoscalingConfig
    except ImportError:  # validated where Serve runs
        return cfg
    try:
        AutoscalingConfig(**cfg)
    except ValidationError as e:
        raise ValueError("autoscaling_config: " + "; ".join(_problem(err) for err in e.errors())) from None
    return cfg


def _problem(err: dict[str, Any]) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    loc = ".".join(map(str, err["loc"]))
    return f"{loc}: {msg}" if loc else msg


# ----------------------------------------------------------------------------------------- replica side

def _bucket_keys(name: str) -> list[str]:
    return [f"{name}_b{i:02d}" for i in range(len(LATENCY_BUCKETS_S) + 1)]


TTFT_KEYS, ITL_KEYS = _bucket_keys("raylight_ttft"), _bucket_keys("raylight_itl")
WAITING_KEY, RUNNING_KEY, KV_KEY = "raylight_waiting", "raylight_running", "raylight_kv_usage"


class RequestClock:
    """One request's token timing at a replica; `tokens(n)` after each output that carried n new tokens."""

    __slots__ = ("rec", "start", "last")

    def __init__(self, rec: "SLORecorder"):
        self.rec, self.start, self.last = rec, time.monotonic(), None

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.rec.ttft[bisect.bisect_left(LATENCY_BUCKETS_S, now - self.start)] += 1
        else:
            self.rec.itl[bisect.bisect_left(LATENCY_BUCKETS_S, (now - self.last) / n)] += n
        self.last = now


class SLORecorder:
    """TTFT and ITL histograms of one replica since the last `take()` (Serve's autoscaling stats call)."""

    def __init__(self):
        self.ttft = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.itl = [0] * (len(LATENCY_BUCKETS_S) + 1)

    def request(self) -> RequestClock:
        return RequestClock(self)

    def take(self, waiting: float, running: float, kv_usage: float) -> dict[str, float]:
        """The autoscaling stats: the bucket counts since the previous call (then reset) and the gauges."""
        out: dict[str, float] = {k: float(v) for k, v in zip(TTFT_KEYS, self.ttft)}
        out.update({k: float(v) for k, v in zip(ITL_KEYS, self.itl)})
        self.ttft[:] = [0] * len(self.ttft)
        self.itl[:] = [0] * len(self.itl)
        out.update({WAITING_KEY: float(waiting), RUNNING_KEY: float(running), KV_KEY: float(kv_usage)})
        return out


def new_tokens(out: Any) -> int:
    """Tokens a RequestOutput added (its longest completion's delta; n-way completions step together);
    0 for anything else (a disaggregated decode request's KV reservation)."""
    return max((len(c.delta_token_ids) for c in getattr(out, "outputs", None) or ()), default=0)


# ---------------------------------------------------------------------------------------- policy side

def quantile(counts: list[float], q: float) -> Optional[float]:
    """The q-quantile of a histogram over LATENCY_BUCKETS_S (linear inside the bucket; the last bucket,
    open above, answers its lower bound). None when empty."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen = q * total, 0.0
    for i, c in enumerate(counts):
        if c > 0 and seen + c >= rank:
            if i == len(LATENCY_BUCKETS_S):
                return LATENCY_BUCKETS_S[-1]
            lo = LATENCY_BUCKETS_S[i - 1] if i else 0.0
            return lo + (LATENCY_BUCKETS_S[i] - lo) * (rank - seen) / c
        seen += c
    return LATENCY_BUCKETS_S[-1]


def _values(series) -> list[float]:
    return [float(getattr(p, "value", p)) for p in series or ()]


def pool_signals(raw_metrics: Optional[dict], running_replicas, queued_at_handles: float = 0.0,
                 min_samples: int = 5) -> Optional[dict[str, Optional[float]]]:
    """The pool's signals over the window from Serve's raw per-replica series ({metric: {replica: series}}),
    None when no running replica has reported yet. Each signal is None when it has no data."""
    raw = raw_metrics or {}
    reporting = [r for r in running_replicas if r in raw.get(WAITING_KEY, {})]
    if not reporting:
        return None

    def pooled_p90(keys: list[str]) -> Optional[float]:
        counts = [sum(sum(_values(raw.get(k, {}).get(r))) for r in reporting) for k in keys]
        return quantile(counts, 0.9) if sum(counts) >= min_samples else None

    def means(key: str) -> list[float]:
        return [sum(v) / len(v) for r in reporting if (v := _values(raw.get(key, {}).get(r)))]

    waiting = sum(means(WAITING_KEY)) + max(0.0, float(queued_at_handles or 0.0))
    kv = means(KV_KEY)
    return {"ttft_p90_s": pooled_p90(TTFT_KEYS), "itl_p90_s": pooled_p90(ITL_KEYS),
            "waiting_per_replica": waiting / max(1, len(running_replicas)),
            "kv_usage": sum(kv) / len(kv) if kv else None}


def pressure(signals: dict[str, Optional[float]], targets: SLOTargets) -> tuple[float, Optional[str]]:
    """The largest value / target over the configured targets with a value, and that signal's name."""
    worst, which = 0.0, None
    for signal, target in _SIGNALS:
        goal, value = getattr(targets, target), signals.get(signal)
        if goal is not None and value is not None and value / goal > worst:
            worst, which = value / goal, signal
    return worst, which


def decide(signals: Optional[dict[str, Optional[float]]], targets: SLOTargets, running: int, target: int,
           lo: int = 1, hi: int = 1 << 30) -> tuple[int, str]:
    """The replica count the pool wants (before Serve's delays and factors) and why; the rule is in the
    module docstring. `running`: replicas running now; `target`: Serve's current target; `lo`, `hi`: bounds."""
    if signals is None:
        return target, "hold: no replica has reported"
    p, which = pressure(signals, targets)
    n = max(1, running)
    if p > 1:
        want = max(target, n + 1, min(math.ceil(n * p - 1e-9), math.floor(targets.max_scale_up_ratio * n)))
        return max(lo, min(hi, want)), f"up: {which} at {p:.2f}x its target"
    projected = p * n / (n - 1) if n > 1 else math.inf
    if running == target and target > lo and (p == 0.0 or projected < targets.scale_down_below):
        return target - 1, f"down: pressure {p:.2f} ({which or 'idle'}), {projected:.2f} with one replica fewer"
    return target, f"hold: pressure {p:.2f} ({which or 'idle'})"


class SLOPolicy:
    """Serve's custom autoscaling policy (a class: Serve builds it once with `policy_kwargs`, the targets,
    and calls it with an AutoscalingContext every control-loop tick)."""

    def __init__(self, **targets):
        self.targets = SLOTargets(**targets)
        self.last_reason: Optional[str] = None

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        try:
            queued = float(ctx.total_queued_requests or 0.0)
        except Exception:  # not every Serve version counts handle queues
            queued = 0.0
        signals = pool_signals(ctx.raw_metrics, ctx.running_replicas, queued, self.targets.min_samples)
        want, reason = decide(signals, self.targets, ctx.current_num_replicas, ctx.target_num_replicas,
                              ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)
        state = dict(ctx.policy_state or {})
        state["raylight_slo"] = {"signals": signals, "want": want, "reason": reason}
        kind = reason.split(":")[0]
        if kind != self.last_reason:  # log changes of direction, not every tick
            logger.info("raylight SLO autoscaling of %s: %d -> %d (%s; signals %s)", ctx.deployment_name,
                        ctx.target_num_replicas, want, reason, signals)
            self.last_reason = kind
        return want, state
