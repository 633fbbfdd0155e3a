"""An asyncio event loop on a daemon thread, so sync code (Serve replicas, tests, the CLI) can host grpc.aio servers.

Serve runs user code on its own loop(s) and may block it; the data plane gets a loop of its own so a slow Serve
call never stalls a Forward. `run(coro)` runs a coroutine on the loop and waits for its result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any

CLOSE_TIMEOUT_S = 2.0  # how long a stopping loop waits for its cancelled tasks to end


class LoopThread:
    """A private event loop running on its own daemon thread."""

    def __init__(self, name: str):
        # Always the stdlib selector loop, whatever the process's policy (Ray installs uvloop's): measured no
        # faster here, and `replica.claim_grpc_poller` finds grpc's reader through the selector.
        self.loop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # As asyncio.run ends a loop: what is still pending when it stops (gRPC's per-call coroutines of a server
        # stopped a moment before, a coalescer batch on the compute thread) is cancelled and run to its end, not
        # left suspended for the GC to close later (which printed "Task was destroyed but it is pending!" and
        # GeneratorExit tracebacks from grpc's _schedule_rpc_coro).
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.loop.is_running()

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        """Run `coro` on the loop thread and return its result (raises its exception)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Schedule `coro` on the loop thread; the returned future is waitable from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, end what is pending on it, close it.

        A grpc.aio server or channel made on this loop must be freed only after this returns. Freeing a process's
        last grpc.aio object shuts grpc.aio's poller down in the thread that frees it: it takes the poller's socket
        from every loop and closes it while this loop's thread may be reading it, which printed "Exception in
        callback ... OSError: [Errno 9] Bad file descriptor" from a stopped directory in about 1 of 6 runs of
        benchmarks/dispatch_roundtrip.py. On a closed loop there is nothing left to race."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
