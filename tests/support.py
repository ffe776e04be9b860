"""What tests share besides checkpoints: the parity tolerance, a compile counter, a plan checker."""

from __future__ import annotations

import contextlib

# Our own parity bound (the public promise is 1e-4): measured errors are about 1e-6, and a tanh-GELU slip
# (up to 4.7e-4) must fail.
TOLERANCE = 2e-5
# The same pairs scored twice agree to float rounding, not bit for bit: a call's batch shapes depend on
# what its engine compiled before (flax_ce.planning), and another shape sums in another order.
ROUNDING = 1e-6


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


def check_plan(plan, lengths, max_length: int = 512, **settings) -> None:
    """An unpacked plan's invariants: every input once, in a planned shape it fits, rows a multiple of the
    device count, at most batch_size inputs a batch (sentence-transformers' meaning), within the budget."""
    import numpy as np

    from flax_ce.planning import planned_shapes

    seen = np.concatenate([b.indices for b in plan])
    assert sorted(seen) == list(range(len(lengths)))
    shapes = planned_shapes(max_length, **settings)
    for batch in plan:
        assert (batch.rows, batch.length) in shapes
        assert all(lengths[i] <= batch.length for i in batch.indices)
        assert batch.rows % settings.get("multiple", 1) == 0 and len(batch.indices) <= batch.rows
        assert len(batch.indices) <= settings.get("batch_size", batch.rows)
        if "token_budget" in settings and batch.rows > settings.get("multiple", 1):
            assert batch.rows * batch.length <= settings["token_budget"]
