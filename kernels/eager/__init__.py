"""Eager execution of the ops: the direct call and its replay, the per-regime choice of
implementation, and the state derived from each layer's tensors."""
