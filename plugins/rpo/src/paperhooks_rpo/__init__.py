"""paperhooks plugin ``rpo``: RPO (Liu et al., NeurIPS 2024), DPO plus the SFT loss of the chosen responses."""

from paperhooks_rpo.functional import sft_term
from paperhooks_rpo.plugin import Rpo, RpoConfig

__all__ = ["Rpo", "RpoConfig", "sft_term"]
