"""paperhooks plugin ``dsee``: low-rank + sparse adaptation of frozen weights, then pruning (DSEE, ACL 2023)."""

from paperhooks_dsee.functional import DseeDelta, dsee_delta, grebsmo_sparse, support
from paperhooks_dsee.plugin import Dsee, DseeConfig

__all__ = ["Dsee", "DseeConfig", "DseeDelta", "dsee_delta", "grebsmo_sparse", "support"]
