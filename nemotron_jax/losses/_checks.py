"""Trace-time argument checks shared by the loss functions.

Everything here looks only at static information (shapes, dtypes, Python values), so a bad argument raises
`ValueError` while the function is being traced, before anything runs.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raises ValueError unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def check_rank(name: str, array: Any, rank: int) -> None:
    if jnp.ndim(array) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {jnp.shape(array)}")


def check_same_shape(name: str, array: Any, reference_name: str, reference: Any) -> None:
    if jnp.shape(array) != jnp.shape(reference):
        raise ValueError(
            f"{name} has shape {jnp.shape(array)} but {reference_name} has shape {jnp.shape(reference)}; "
            "they must be equal"
        )


def check_floating(name: str, array: Any) -> None:
    if not jnp.issubdtype(jnp.result_type(array), jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(array)}")


def check_integer(name: str, array: Any) -> None:
    if not jnp.issubdtype(jnp.result_type(array), jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {jnp.result_type(array)}")


def is_concrete_number(value: Any) -> bool:
    """True for a Python (or NumPy) real number, whose value can be checked at trace time."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> None:
    """Checks the range of a hyperparameter when it is a concrete number.

    Traced scalars (for example a schedule computed inside `jit`) cannot be checked at trace time and pass.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got a bool ({value!r})")
    if isinstance(value, jax.Array) and jnp.ndim(value) == 0:
        return  # possibly traced: its value is not known at trace time
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not is_concrete_number(value):
        raise ValueError(f"{name} must be a real number or a scalar array, got {value!r}")
    if minimum is not None:
        if exclusive_minimum and not value > minimum:
            raise ValueError(f"{name} must be > {minimum}, got {value}")
        if not exclusive_minimum and not value >= minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and not value <= maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_importance_band(is_low: Any, is_high: Any) -> None:
    """Bounds of an importance weight: 0 <= is_low <= is_high and is_high > 0 (where the values are concrete)."""
    check_number("is_low", is_low, minimum=0.0)
    check_number("is_high", is_high, minimum=0.0, exclusive_minimum=True)
    if is_concrete_number(is_low) and is_concrete_number(is_high) and is_low > is_high:
        raise ValueError(f"is_low={is_low} must not exceed is_high={is_high}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive Python int, got {value!r}")


def check_chunk_sizes(chunk_size: Any, token_chunk_size: Any) -> None:
    """Tiling of the chunked functions: a positive `chunk_size`, and a positive or None `token_chunk_size`."""
    check_positive_int("chunk_size", chunk_size)
    if token_chunk_size is not None:
        check_positive_int("token_chunk_size", token_chunk_size)


def as_array(value: Any) -> Any:
    """jnp.asarray for array-likes (lists, NumPy arrays); None passes through."""
    return None if value is None else jnp.asarray(value)


def compute_dtype(*arrays: Any) -> jnp.dtype:
    """float32, or float64 when an input already is float64 (bf16/f16 inputs are promoted to float32)."""
    dtype = jnp.dtype(jnp.float32)
    for array in arrays:
        if array is not None and jnp.issubdtype(jnp.result_type(array), jnp.floating):
            dtype = jnp.promote_types(dtype, jnp.result_type(array))
    return dtype
