"""paperhooks plugin ``pst``: PST (Li et al., IJCAI 2022), learned sparsity scores on frozen weights."""

from paperhooks_pst.functional import PstWeight, cubic_bounds, pst_scores
from paperhooks_pst.plugin import Pst, PstConfig

__all__ = ["Pst", "PstConfig", "PstWeight", "cubic_bounds", "pst_scores"]
