"""Hook specifications, one module per family. ``SPEC_MODULES`` is the full set."""

from paperhooks.hookspecs import (
    lifecycle,
    metric,
    objective,
    objweight,
    optimizer,
    perturb,
    pruning,
    reparam,
    surgery,
    transform,
    weighting,
)

SPEC_MODULES = (
    weighting,
    objective,
    objweight,
    surgery,
    reparam,
    pruning,
    optimizer,
    metric,
    perturb,
    transform,
    lifecycle,
)
