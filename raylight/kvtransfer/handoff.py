"""The life of one disaggregated request on its decode replica, as a state machine.

    RESERVED --(every sender's share landed)--> READY --(admitted to the scheduler)--> RUNNING
    RESERVED --(prefill failed / lease expired / client gone)--> QUARANTINED --(no write can land)--> RELEASED
    RUNNING  --(the request's blocks belong to the scheduler now)--> RELEASED

RESERVED blocks may be written by a prefill replica at any moment, so they are never reused
while in that state: a failure moves them to QUARANTINED, where they stay held until the prefill
side can no longer write (its replica is known to be dead or done, or a second lease passes), and
only then go back to the pool. Every transition is checked: blocks are released exactly once.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class HandoffState(enum.Enum):
    RESERVED = "reserved"
    READY = "ready"
    RUNNING = "running"
    QUARANTINED = "quarantined"
    RELEASED = "released"


_ALLOWED = {
    HandoffState.RESERVED: {HandoffState.READY, HandoffState.QUARANTINED},
    HandoffState.READY: {HandoffState.RUNNING, HandoffState.QUARANTINED},
    HandoffState.RUNNING: {HandoffState.RELEASED},
    HandoffState.QUARANTINED: {HandoffState.RELEASED},
    HandoffState.RELEASED: set(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class Handoff:
    transfer_id: int
    request: Any  # the engine's Request
    num_tokens: int  # prompt positions whose KV the prefill side writes ([0, num_tokens), cached ones included)
    num_shipped_blocks: int  # blocks that actually travel (past the decode side's cached prefix)
    lease_s: float
    state: HandoffState = HandoffState.RESERVED
    reserved_at: float = field(default_factory=time.monotonic)
    reason: str = ""  # why it left RESERVED for QUARANTINED
    blocks: list = field(default_factory=list)  # held while QUARANTINED
    release_at: float = 0.0

    def to(self, state: HandoffState, reason: str = "") -> None:
        if state not in _ALLOWED[self.state]:
            raise IllegalTransition(f"transfer {self.transfer_id}: {self.state.value} -> {state.value}")
        self.state = state
        if reason:
            self.reason = reason

    def expired(self, now: float) -> bool:
        return self.state is HandoffState.RESERVED and now - self.reserved_at > self.lease_s
