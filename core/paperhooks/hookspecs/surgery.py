"""Gradient surgery: from one gradient per objective to one update direction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    from paperhooks.context import StepContext
    from paperhooks.gradients import Direction, GradientSet


@hookspec
def surgery_combine(grads: GradientSet, ctx: StepContext) -> GradientSet | Direction | None:
    """Turn the K per-objective gradients into a new set or an update direction.

    :param grads: a :class:`paperhooks.gradients.GradientSet`: one row per objective, the
        gradients of the *global* objectives over the surgery parameters (identical on all
        ranks), with ``gram()``, ``norms()``, ``dot()``, ``combine(weights)``, ``transform(A)``,
        ``project_out(i, j)``, ``select(names)``, ``with_rows(rows)``, ``view(param)``; never the
        gradient of the summed loss.
    :param ctx: the step context.
    :return: a new ``GradientSet``, a ``Direction`` (e.g. ``grads.combine(weights)``: the
        objective coefficients of the update), or ``None`` (unchanged).

    Several plugins: chained in recipe order; each receives the previous result while it is
    still a set; once one returns a direction the chain stops. A set left at the end is summed
    over k. Parameters outside the surgery set (see ``surgery_parameters``) get the same
    combination when the direction is ``Σ_k w_k g_k``, else the plain sum. Turning this family
    on switches the module to manual optimization. Called from ``HookedModule.training_step``
    after the per-objective gradients exist (step 7).

    A plugin that uses only inner products, linear combinations and element-wise operations
    sets ``columns_ok = True``; when all do, DDP hands each rank a column slice (one
    reduce-scatter instead of an all-reduce of ``K×P``).
    """


@hookspec
def surgery_parameters(module: Any, names: Sequence[str]) -> Sequence[str] | None:
    """The names of the parameters the surgery acts on (default: every trainable parameter).

    :param module: the ``HookedModule``.
    :param names: the names of its trainable parameters (``module.named_parameters()``).
    :return: a subset of ``names``, or ``None`` for all of them.

    Several plugins: the intersection. Called once per step before the gradients are taken.
    """
