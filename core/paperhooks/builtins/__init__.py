"""Plugins shipped with the core distribution (baselines of a family, found like any plugin).

They are registered in the core's own ``pyproject.toml`` under the entry-point group
``paperhooks``, so ``paperhooks plugins`` lists them and a recipe names them like any other.
"""
