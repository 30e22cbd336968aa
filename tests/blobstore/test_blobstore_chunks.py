"""ChunkRef: validation and the plain-dict form the lead turns into protobuf."""

from __future__ import annotations

import pytest

from thaw.blobstore import ChunkRef, digest_of
from thaw.core.errors import InvalidArgument

DIGEST = digest_of(b"weights")


def test_round_trips_through_a_plain_dict() -> None:
    ref = ChunkRef(digest=DIGEST, offset=4096, length=100, stored_length=40, compression="lz4")
    fields = ref.to_dict()
    assert fields == {"digest": DIGEST, "offset": 4096, "length": 100, "stored_length": 40,
                      "compression": "lz4"}
    assert ChunkRef.from_dict(fields) == ref


def test_from_dict_names_the_missing_field() -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        ChunkRef.from_dict({"digest": DIGEST, "offset": 0, "length": 1})
    assert excinfo.value.field == "stored_length"


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"digest": "../../etc/passwd"}, "digest"),
        ({"digest": DIGEST.upper()}, "digest"),
        ({"offset": -1}, "offset"),
        ({"length": 1.5}, "length"),
        ({"compression": "zstd"}, "compression"),
    ],
)
def test_rejects_malformed_fields(fields: dict[str, object], bad: str) -> None:
    good: dict[str, object] = {"digest": DIGEST, "offset": 0, "length": 1, "stored_length": 1,
                               "compression": "none"}
    with pytest.raises(InvalidArgument) as excinfo:
        ChunkRef.from_dict(good | fields)
    assert excinfo.value.field == bad
