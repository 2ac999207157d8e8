"""Streaming fragments (``sync.fragments``): how the vector is cut, which round syncs which
fragment, and which configs are refused."""

from __future__ import annotations

import itertools

import pytest

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import loads
from dandelion_p2p.worker import fragments, protocol

BASE = 'name = "s"\n[model]\nbase = "m"\n'


@pytest.mark.parametrize(("count", "elements"), [(1, 7), (3, 10), (4, 4), (64, 1000), (5, 3)])
def test_fragments_cover_the_vector_once_in_nearly_equal_parts(count: int,
                                                                elements: int) -> None:
    spans = [fragments.span(count, f, elements) for f in range(count)]
    assert spans[0][0] == 0 and spans[-1][1] == elements
    for (_, stop), (start, _) in itertools.pairwise(spans):
        assert stop == start
    sizes = [b - a for a, b in spans]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        fragments.span(count, count, elements)


def test_rounds_come_every_h_over_f_steps_and_take_the_fragments_in_turn() -> None:
    config = loads(BASE + "[sync]\nlocal_steps = 12\noverlap = true\nfragments = 3\n")
    assert fragments.interval(config) == 4
    assert [fragments.fragment_of(config, r) for r in range(1, 8)] == [1, 2, 0, 1, 2, 0, 1]
    assert fragments.round_span(config, 2, 9) == (6, 9)
    plain = loads(BASE + "[sync]\nlocal_steps = 12\n")
    assert fragments.interval(plain) == 12
    assert fragments.round_span(plain, 5, 9) == (0, 9)


def test_only_a_streaming_round_names_its_span() -> None:
    streaming = loads(BASE + "[sync]\nlocal_steps = 12\noverlap = true\nfragments = 3\n")
    assert fragments.named_span(streaming, (6, 9)) == (6, 9)
    plain = loads(BASE + "[sync]\nlocal_steps = 12\noverlap = true\n")
    assert fragments.named_span(plain, (0, 9)) is None


@pytest.mark.parametrize(("sync", "message"), [
    ("local_steps = 10\noverlap = false\nfragments = 2\n", "need overlapped rounds"),
    ('mode = "gradient"\nfragments = 2\n', "need overlapped rounds"),
    ("local_steps = 10\noverlap = true\nfragments = 3\n", "must divide sync.local_steps"),
    ("local_steps = 128\noverlap = true\nfragments = 128\n", "must be 1-64"),
    ("local_steps = 10\noverlap = true\nfragments = 0\n", "must be 1-64"),
])
def test_a_streaming_config_that_cannot_work_is_refused(sync: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        loads(BASE + "[sync]\n" + sync)


@pytest.mark.parametrize("span", [[0], [3, 3], [-1, 2], [0, 11], [2, "5"], "0:5", [True, 4]])
def test_a_sync_request_with_a_span_outside_the_buffer_is_refused(span: object) -> None:
    with pytest.raises(ConfigError, match="span"):
        protocol.sync_span({"span": span}, 10)


def test_a_sync_request_names_a_span_or_the_whole_buffer() -> None:
    assert protocol.sync_span({}, 10) is None
    assert protocol.sync_span({"span": [0, 10]}, 10) == (0, 10)
    assert protocol.sync_span({"span": [9, 10]}, 10) == (9, 10)
