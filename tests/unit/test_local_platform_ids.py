"""The local broker's KRaft cluster id: never one the storage tool would read as an option."""

from __future__ import annotations

import re

from pipelines.local.platform import kraft_cluster_id


def test_an_id_starting_with_a_dash_is_drawn_again():
    draws = iter([b"\xf8" + bytes(15), bytes(16)])  # the first encodes as "-AAAA...": an option to argparse
    assert kraft_cluster_id(lambda: next(draws)) == "AAAAAAAAAAAAAAAAAAAAAA"


def test_ids_are_22_base64url_characters():
    for _ in range(200):
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", kraft_cluster_id())
