"""One intra-op thread (here and in subprocesses) and quiet Lightning logs for every test here."""

from paperhooks.testing.fixtures import one_thread, quiet_lightning  # noqa: F401
