"""The maps of the tree that people read (docs/design.md's module map, README's layout table)
name what is there, and everything that is there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("contract", "nn", "train", "export", "serve", "bench")
# modules the map describes together with another row, or that only start a stage
UNLISTED = {"__main__.py", "__init__.py"}


def _map_rows(text: str) -> str:
    start = text.index("### Module map")
    end = text.find("\n## ", start)
    return text[start : end if end != -1 else len(text)]


def test_the_module_map_names_every_module_and_nothing_else() -> None:
    rows = _map_rows((ROOT / "docs" / "design.md").read_text())
    stage = "|".join(STAGES)
    named = set(re.findall(rf"`((?:{stage})/[\w/]+\.py)`", rows))
    present = {
        str(path.relative_to(ROOT))
        for stage in STAGES
        for path in (ROOT / stage).glob("*.py")
        if path.name not in UNLISTED and not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    } | {"contract/__init__.py"}  # the contract is its package module
    assert sorted(named - present) == [], "the map names modules that are not in the tree"
    assert sorted(present - named) == [], "modules missing from docs/design.md's module map"


def test_the_readme_layout_table_lists_every_stage_and_folder_it_names() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout") :]
    table = table[: table.index("\n## ", 1)]
    folders = re.findall(r"^\| `([\w.-]+)/`", table, flags=re.MULTILINE)
    assert set(STAGES) <= set(folders)
    for folder in folders:
        assert (ROOT / folder).is_dir(), folder
