"""Ensembles of whole models: a pool of members with measured costs, and gates over them.

- :mod:`.pool`: :class:`Member`, :class:`MemberPool`, :func:`measure_latency`,
  :func:`count_flops`, :func:`digits_pool` (a heterogeneous pool trained on digits).
- :mod:`.moe2`: MoE² (arXiv 2501.09410): a gate over the members' output distributions and
  the subset choice under energy and latency budgets by discrete monotonic optimisation.
"""

from .pool import LogitsOnly, Member, MemberPool, count_flops, digits_pool, measure_latency

__all__ = [
    "LogitsOnly",
    "Member",
    "MemberPool",
    "count_flops",
    "digits_pool",
    "measure_latency",
]
