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
    leave_one_out_std: bool = False,
) -> jax.Array:
    """GRPO advantages of `N` samples laid out as consecutive groups of `group_size` samples per prompt.

    For sample i of a group with rewards r_1..r_G:
      baseline_i = mean_j r_j                       (default), or
                   (sum_j r_j - r_i) / (G - 1)      (`leave_one_out=True`);
      A_i = r_i - baseline_i, then, when `normalize_std`, divided by (s_i + eps) where
        s_i = std_j r_j, the group's standard deviation with `std_ddof` degrees of freedom (1: unbiased, as
              torch.std; 0: population) (default), or
        s_i = std_{j != i} r_j, the standard deviation of the other G - 1 rewards (`leave_one_out_std=True`);
              a sample whose s_i is 0 (the others all equal, or too few of them for `std_ddof`) is not
              divided, as in NeMo-RL ("don't sharpen the ones with no variation").
    A group whose rewards are all equal gets exactly zero advantages (whatever the options).

    Cascade-2's GRPO (plain group mean and std) is the default. NeMo-RL's GRPO default
    (`use_leave_one_out_baseline: true`, `normalize_rewards: true`) is `leave_one_out=True,
    leave_one_out_std=True` (its std is then the leave-one-out one); with `use_leave_one_out_baseline:
    false` it is the default here.

    Args:
      rewards: `[N]` float (or int/bool), N a multiple of `group_size`.
      group_size: samples per prompt (G), a positive Python int.
      normalize_std: divide by the group standard deviation plus `eps`.
      leave_one_out: use the leave-one-out mean as the baseline (needs G >= 2).
      leave_one_out_std: normalise by the leave-one-out standard deviation (needs G >= 2).
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
    if leave_one_out_std and group_size < 2:
        raise ValueError(f"leave_one_out_std needs group_size >= 2, got group_size={group_size}")
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
    if normalize_std and leave_one_out_std:
        # [groups, i, j]: the deviations of the others j != i from their own mean (exact; no E[r^2] - E[r]^2).
        others = ~jnp.eye(group_size, dtype=bool)
        others_mean = (group_sum - grouped) / (group_size - 1)
        deviations = jnp.where(others, grouped[:, None, :] - others_mean[:, :, None], 0.0)
        dof = group_size - 1 - std_ddof
        if dof > 0:
            std = jnp.sqrt(jnp.sum(jnp.square(deviations), axis=2) / dof)
        else:
            std = jnp.zeros_like(grouped)
        advantages = jnp.where(std > 0, advantages / (std + eps), advantages)
    elif normalize_std:
        variance = jnp.sum(jnp.square(grouped - group_mean), axis=1, keepdims=True) / (group_size - std_ddof)
        advantages = advantages / (jnp.sqrt(variance) + eps)
    # Rounding can leave ~1 ulp between equal rewards and their mean; amplified by 1/eps that would not be 0.
    all_equal = jnp.max(grouped, axis=1, keepdims=True) == jnp.min(grouped, axis=1, keepdims=True)
    advantages = jnp.where(all_equal, jnp.zeros((), dtype), advantages)
    return advantages.reshape(num_samples)
