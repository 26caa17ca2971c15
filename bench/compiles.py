"""Counting XLA compiles (used by the benches and by tests that check a change compiles nothing)."""

from __future__ import annotations

import jax


class Compiles:
    """Counts XLA compiles and their seconds while active (`with Compiles() as c: ...; c.count, c.seconds`)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count, self.seconds, self.names = 0, 0.0, []

    def _on(self, event: str, duration: float, **kw) -> None:
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration
            self.names.append(kw.get("fun_name", "?"))

    def __enter__(self) -> Compiles:
        jax.monitoring.register_event_duration_secs_listener(self._on)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on)
