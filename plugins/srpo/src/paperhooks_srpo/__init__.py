"""paperhooks plugin ``srpo``: SRPO (Choi et al., ICLR 2025), a generator and an in-context reviser trained
offline by two regressions (a reconstruction: the paper's loss section was not readable)."""

from paperhooks_srpo.functional import (
    prompt_length_of,
    response_rows,
    revise,
    revision_batch,
    revision_sequences,
    srpo_losses,
)
from paperhooks_srpo.plugin import Srpo, SrpoConfig

__all__ = [
    "Srpo",
    "SrpoConfig",
    "prompt_length_of",
    "response_rows",
    "revise",
    "revision_batch",
    "revision_sequences",
    "srpo_losses",
]
