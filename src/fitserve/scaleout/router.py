"""Prefix affinity: requests that share a prefix key prefer one replica, unless it is busy.

Why a key from a header and not the prompt itself: Ray Serve's HTTP proxy routes a request
before its body is read. What the router is handed is the request's ASGI scope (path and
headers); the replica pulls the body from the proxy afterwards. So the client names the prefix
(`x-fitserve-prefix-key`: a conversation id, or the id of a shared system prompt), and requests
with the same key go where that prefix's KV blocks already are (docs/scale-out.md).

The preferred replica of a key is chosen by rendezvous hashing over the live replicas: the
replica with the highest hash of (key, replica id). When a replica comes or goes, only the keys
it won move. Each routing attempt ranks the preferred replica first, then two random replicas
(Ray's power of two choices); Ray probes the first rank and falls to the next when the preferred
replica refuses (it already holds max_ongoing_requests). The preferred replica is also skipped
when it holds more than `max_extra_queue` requests beyond the least loaded replica known.
Without the header a request is routed by the power of two choices alone.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from fitserve.scaleout.options import DEFAULT_AFFINITY_MAX_EXTRA_QUEUE, PREFIX_KEY_HEADER

_HEADER = PREFIX_KEY_HEADER.encode()


def prefix_key(request_arg: Any) -> str | None:
    """The `x-fitserve-prefix-key` header of a request as Ray's proxy hands it to the router, else None."""
    if isinstance(request_arg, bytes):  # the proxy's StreamingHTTPRequest, pickled by Ray itself
        try:
            request_arg = pickle.loads(request_arg)  # noqa: S301 - produced by this cluster's own proxy
        except Exception:  # noqa: BLE001 - not an HTTP request: no key
            return None
    scope = getattr(request_arg, "asgi_scope", None)
    if not isinstance(scope, dict):
        return None
    for name, value in scope.get("headers", ()):
        if name.lower() == _HEADER:
            return value.decode("latin-1")
    return None


def rendezvous_order(key: str, replica_ids: list[str]) -> list[str]:
    """Replica ids from most to least preferred for `key` (highest hash of key and id first)."""
    def score(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()
    return sorted(replica_ids, key=score, reverse=True)


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router (`request_router_config`); see the module docstring."""

    def initialize_state(self, max_extra_queue: int = DEFAULT_AFFINITY_MAX_EXTRA_QUEUE, **kwargs: Any) -> None:
        self.max_extra_queue = max_extra_queue

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        two_choices = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        key = prefix_key(pending_request.args[0]) if pending_request is not None and pending_request.args else None
        if key is None or len(candidate_replicas) == 1:
            return [two_choices]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        preferred = by_id[rendezvous_order(key, list(by_id))[0]]
        if self._is_overloaded(preferred.replica_id, candidate_replicas):
            return [two_choices]
        return [[preferred], [r for r in two_choices if r is not preferred] or two_choices]

    def _is_overloaded(self, replica_id: ReplicaID, candidates: list[RunningReplica]) -> bool:
        """True when the cached queue lengths show `replica_id` far above the least loaded replica."""
        cache = self.replica_queue_len_cache
        own = cache.get(replica_id)
        known = [n for n in (cache.get(r.replica_id) for r in candidates) if n is not None]
        return own is not None and bool(known) and own - min(known) > self.max_extra_queue
