"""The parts an object-store output counts, from its commit records as a store lists them (tests' own reading).

Written independently of batchrun's reader, so that a test checks the output against the protocol in
docs/object-storage.md rather than against the code under test: a ``commit`` record counts its part, a
``retire`` record (or a commit that ``replaces`` another) takes a part out.
"""

from __future__ import annotations

from collections.abc import Iterable


def counted_parts(records: Iterable[dict]) -> dict[str, dict]:
    """file -> its commit record, for every part that counts after ``records`` (in any order)."""
    listed: dict[str, dict] = {}
    retired: set[str] = set()
    for record in records:
        if record["op"] == "retire":
            retired.add(record["file"])
        else:
            listed[record["file"]] = record
            retired.update([record["replaces"]] if record.get("replaces") else [])
    return {file: record for file, record in listed.items() if file not in retired}
