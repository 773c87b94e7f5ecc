"""Group-relative advantages (GRPO)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemotron_jax.losses import _checks


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    normalize_std: bool = True,
    leave_one_out: bool = False,
    std_ddof: int = 1,
    eps: float = 1e-6,
) -> jax.Array:
    """GRPO advantages of `N` samples laid out as consecutive groups of `group_size` samples per prompt.

    For sample i of a group with rewards r_1..r_G:
      baseline_i = mean_j r_j                       (default), or
                   (sum_j r_j - r_i) / (G - 1)      (`leave_one_out=True`);
      A_i = r_i - baseline_i, then divided by (std_j r_j + eps) when `normalize_std`, where std is the group's
      standard deviation with `std_ddof` degrees of freedom (1: unbiased, as torch.std; 0: population).
    A group whose rewards are all equal gets exactly zero advantages (whatever the options).

    Cascade-2's GRPO (plain group mean and std) is the default; NeMo-RL's default is `leave_one_out=True`.

    Args:
      rewards: `[N]` float (or int/bool), N a multiple of `group_size`.
      group_size: samples per prompt (G), a positive Python int.
      normalize_std: divide by the group standard deviation plus `eps`.
      leave_one_out: use the leave-one-out mean as the baseline (needs G >= 2).
      std_ddof: delta degrees of freedom of the standard deviation (0 <= std_ddof < G when normalizing).
      eps: added to the standard deviation.

    Returns:
      `[N]` float32 advantages (float64 for float64 rewards).

    Raises:
      ValueError: rewards not rank 1, N not a multiple of `group_size`, bad `group_size`/`std_ddof`/`eps`.
    """
    rewards = _checks.as_array(rewards)
    _checks.check_rank("rewards", rewards, 1)
    _checks.check_positive_int("group_size", group_size)
    num_samples = jnp.shape(rewards)[0]
    if num_samples % group_size:
        raise ValueError(
            f"rewards has {num_samples} samples, which is not a multiple of group_size={group_size}"
        )
    if leave_one_out and group_size < 2:
        raise ValueError(f"leave_one_out needs group_size >= 2, got group_size={group_size}")
    if normalize_std:
        if isinstance(std_ddof, bool) or not isinstance(std_ddof, int) or not 0 <= std_ddof < group_size:
            raise ValueError(f"std_ddof must be an int in [0, group_size={group_size}), got {std_ddof!r}")
        _checks.check_number("eps", eps, minimum=0.0)

    dtype = _checks.compute_dtype(rewards)
    grouped = jnp.asarray(rewards, dtype).reshape(num_samples // group_size, group_size)
    group_sum = jnp.sum(grouped, axis=1, keepdims=True)
    group_mean = group_sum / group_size
    if leave_one_out:
        baseline = (group_sum - grouped) / (group_size - 1)
    else:
        baseline = group_mean
    advantages = grouped - baseline
    if normalize_std:
        variance = jnp.sum(jnp.square(grouped - group_mean), axis=1, keepdims=True) / (group_size - std_ddof)
        advantages = advantages / (jnp.sqrt(variance) + eps)
    # Rounding can leave ~1 ulp between equal rewards and their mean; amplified by 1/eps that would not be 0.
    all_equal = jnp.max(grouped, axis=1, keepdims=True) == jnp.min(grouped, axis=1, keepdims=True)
    advantages = jnp.where(all_equal, jnp.zeros((), dtype), advantages)
    return advantages.reshape(num_samples)
