"""MkDocs hook: write the generated reference pages and list every method card in the nav.

``mkdocs build`` runs :func:`paperhooks.docgen.generate` into ``docs/generated`` first (the
same as ``paperhooks docs``; files whose text is unchanged are not rewritten), then appends
one nav entry per installed plugin's method card to the ``Plugins`` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from paperhooks import docgen

GENERATED = "generated"
SECTION = "Plugins"


def on_config(config: Any) -> Any:
    out = Path(config.docs_dir) / GENERATED
    docgen.generate(out)
    cards = [
        {p.stem: f"{GENERATED}/plugins/{p.name}"} for p in sorted((out / "plugins").glob("*.md"))
    ]
    for item in config.nav or []:
        if isinstance(item, dict) and isinstance(item.get(SECTION), list):
            item[SECTION].extend(cards)
    return config
