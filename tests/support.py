"""What tests share besides checkpoints: the parity tolerance and a compile counter."""

from __future__ import annotations

import contextlib

# Our own parity bound (the public promise is 1e-4): measured errors are about 1e-6, and a tanh-GELU slip
# (up to 4.7e-4) must fail.
TOLERANCE = 2e-5


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block: `with count_compiles() as n: ...; n[0]`."""
    from jax._src import dispatch, monitoring

    counter = [0]

    def listener(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            counter[0] += 1

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        monitoring.unregister_event_duration_listener(listener)
