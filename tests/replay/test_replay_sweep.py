"""The one-pass sweep equals a separate replay of each candidate region alone."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sppkit.engines.replay import ProtectionModel, replay_arrays
from sppkit.engines.replay.sweep import SweepModel, candidates_from_elf
from sppkit.policy import Policy

from replay_helpers import records

BASE = 0x200000 - 3 * 4096  # straddles a 2-MiB boundary: two lazy-SPPT regions


@st.composite
def sweep_case(draw):
    cands = [(f"r{i}", BASE + draw(st.integers(0, 7 * 4096)), draw(st.sampled_from([1, 8, 100, 128, 300, 5000, 9000])))
             for i in range(draw(st.integers(1, 6)))]
    rows = [(BASE + draw(st.integers(0, 8 * 4096)), draw(st.sampled_from([1, 2, 8, 16, 130, 4096, 6000])),
             draw(st.integers(0, 3))) for _ in range(draw(st.integers(0, 60)))]
    return cands, rows


@pytest.mark.parametrize("check", ["all-touched", "first-byte"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sweep_case())
def test_sweep_row_equals_replay_of_that_region_alone(check, case):
    cands, rows = case
    arr = records(rows)
    model = SweepModel(cands, spp_write_check=check)
    c = model.new_counters()
    model.feed_columns(c, arr["gpa"], arr["size"])
    assert c.writes == len(rows)
    for (name, start, length), row in zip(cands, model.rows(c)):
        alone = ProtectionModel.from_policy(Policy.from_ranges([(start, length)]), spp_write_check=check)
        r = replay_arrays(alone, [arr])
        assert row.name == name
        assert (row.page_granular_exits, row.violations, row.spp_misses) == \
            (r.page_granular_exits, r.violations, r.spp_misses)
        assert row.exits_avoided == r.exits_avoided
        assert c.accesses == r.accesses


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError, match="no candidate regions"):
        SweepModel([])


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the bundled guest")
def test_elf_object_symbols_are_candidates():
    from sppkit.guests import build_guest, load_elf

    image = load_elf(build_guest("mixed"))
    cands = {name: (start, length) for name, start, length in candidates_from_elf(image)}
    for name in ("secret", "config", "canary"):
        sym = image.symbols[name]
        assert cands[name] == (sym.addr, sym.size)
    assert all(length > 0 for _, length in cands.values())
