"""Checkpoint reading and conversion from the published PyTorch layouts into flax_ce modules."""
