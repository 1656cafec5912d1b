"""cluster/replica.py RequestWatch: one check ends every request past its deadline; a request whose reader
has not started yet (its grammar still compiling) is tried again at the next check, not forgotten."""

from __future__ import annotations

import asyncio

from raylight.cluster.replica import RequestWatch


class _Engine:
    def __init__(self, readers):
        self.readers, self.failed = set(readers), []

    def fail(self, request_id, error):
        if request_id not in self.readers:
            return False
        self.failed.append((request_id, str(error)))
        return True


def test_past_deadline_requests_end_and_a_request_without_a_reader_yet_is_retried():
    def failure(rid, deadline, now):
        return TimeoutError(f"{rid} late") if deadline is not None and now >= deadline else None

    async def main():
        eng = _Engine({"late", "ok"})
        watch = RequestWatch(failure, eng.fail)
        keys = {rid: object() for rid in ("late", "ok", "compiling", "no_deadline")}
        watch.add(keys["late"], "late", 0.0)
        watch.add(keys["ok"], "ok", 1e18)
        watch.add(keys["compiling"], "compiling", 0.0)
        watch.add(keys["no_deadline"], "no_deadline", None)
        watch.check()
        assert eng.failed == [("late", "late late")]
        assert {rid for rid, _ in watch.deadlines.values()} == {"ok", "compiling", "no_deadline"}
        eng.readers.add("compiling")  # its reader started
        watch.check()
        assert eng.failed[-1] == ("compiling", "compiling late")
        for key in keys.values():
            watch.discard(key)
        await asyncio.wait_for(watch.task, 1.0)  # nothing left to watch: the task ends

    asyncio.run(main())
