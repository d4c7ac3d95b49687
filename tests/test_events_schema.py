"""docs/events.md lists exactly the event types and fields that the schema
(ddlkit/events.py) defines, and what ranks send fits the schema."""

from __future__ import annotations

import re
from pathlib import Path

from ddlkit import events

DOC = Path(__file__).resolve().parent.parent / "docs" / "events.md"


def documented() -> dict[str, set[str]]:
    """{type: fields} from the table: the first column's name, the fields column's `names`."""
    table = {}
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+`", cells[0]):
            table[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", cells[2]))  # `"forward"` and `a.b` are values
    return table


def test_the_doc_lists_exactly_the_types_and_fields_of_the_schema():
    table = documented()
    assert sorted(table) == sorted(events.TYPES)
    for kind in events.TYPES:
        assert table[kind] == set(events.fields(kind)), kind


def test_every_event_type_has_the_common_fields_optional_but_type():
    for kind, schema in events.TYPES.items():
        assert "type" in schema.__required_keys__, kind
        assert {"rank", "time", "attempt"} <= schema.__optional_keys__, kind
