"""Shared helpers of the loss tests."""

import math
import re

import pytest


def _gathers_at_least(hlo, num_elements):
    """All-gather instructions of the compiled `hlo` text whose result holds >= `num_elements` values
    (by size, so a flattened or padded gather of the same values is caught too)."""
    found = []
    for line in hlo.splitlines():
        if " all-gather(" not in line and " all-gather-start(" not in line:
            continue
        result_type = line.split("=", 1)[1].split("all-gather", 1)[0]
        for dims in re.findall(r"\[([\d,]*)\]", result_type):
            if math.prod(int(d) for d in dims.split(",") if d) >= num_elements:
                found.append(line.strip()[:160])
    return found


@pytest.fixture
def gathers_at_least():
    return _gathers_at_least
