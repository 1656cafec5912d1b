"""Request metrics shared between the replicas of one app's ingress (`ingress_replicas` > 1).

Latencies, token counts and aborts are observed where the client's stream ends: in the ingress. With
several ingress replicas, Serve's proxy sends a scrape of /metrics to one of them, which alone saw only
its share of the requests. So each replica posts its own request samples, every `PERIOD_S` and on each
scrape, to one small actor per app (`IngressPeers`, named after the app and created by whichever replica
asks first), which answers with the other replicas' last samples; the scraped replica serves the sums
(`ServerMetrics.set_peers`). A sibling's figures are at most `PERIOD_S` old; a replica that stopped
posting (scaled down, dead) drops out after `STALE_S`, so its counters leave the sums as a restarted
process's would. If the actor's owner (the replica that created it) goes, the next post recreates it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

logger = logging.getLogger("raylight.ingress")

NAMESPACE = "raylight"  # the actor's Ray namespace, whatever the replica's
PERIOD_S = 1.0
STALE_S = 30.0
SamplesT = list[tuple[str, tuple[tuple[str, str], ...], float]]


class IngressPeers:
    """The actor: each ingress replica's last request samples, by replica id."""

    def __init__(self):
        self.samples: dict[str, tuple[float, SamplesT]] = {}

    def post(self, ingress_id: str, samples: SamplesT) -> dict[str, SamplesT]:
        """Stores `ingress_id`'s samples; returns every other live replica's."""
        now = time.monotonic()
        self.samples[ingress_id] = (now, samples)
        for k in [k for k, (t, _) in self.samples.items() if now - t > STALE_S]:
            del self.samples[k]
        return {k: s for k, (_, s) in self.samples.items() if k != ingress_id}


class PeerLink:
    """The ingress replica's side: posts its samples and keeps its siblings' in `metrics`."""

    def __init__(self, app_name: str, ingress_id: str, metrics):
        self.name = f"raylight-ingress-peers:{app_name}"
        self.ingress_id = ingress_id
        self.metrics = metrics
        self._actor: Optional[Any] = None
        self._task: Optional[asyncio.Task] = None

    def _handle(self):
        if self._actor is None:
            import ray

            # Owned by the replica that creates it (not detached): it goes with the app.
            self._actor = ray.remote(num_cpus=0, max_concurrency=1)(IngressPeers).options(
                name=self.name, namespace=NAMESPACE, get_if_exists=True).remote()
        return self._actor

    async def exchange(self, timeout_s: float = 2.0) -> None:
        try:
            peers = await asyncio.wait_for(self._handle().post.remote(self.ingress_id, self.metrics.request_samples()),
                                           timeout_s)
        except Exception as e:  # the actor's owner went away, or it is slow: keep what we had, ask again later
            logger.debug("ingress peers: %s", e)
            self._actor = None
            return
        self.metrics.set_peers(peers)

    def start(self) -> None:
        """Posts every PERIOD_S from now on (call from the event loop; once is enough)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.exchange()
            await asyncio.sleep(PERIOD_S)
