"""Autograd operations of agent_mm (no parameters, no registry).

- :mod:`.shared_bias_attention`: softmax attention with one bias shared by
  the batch, rebuilt in backward instead of stored.
- :mod:`.blocked_attention`: the same attention for inference only, by
  blocks of explicit products (bfloat16 on CPUs without AMX).
"""
