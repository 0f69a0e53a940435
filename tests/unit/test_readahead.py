"""ReadState: sequential detection that survives the kernel's out-of-order read-ahead."""

from __future__ import annotations

from fusionfs.fetch import ReadState


def test_out_of_order_reads_of_one_stream_keep_the_window_open() -> None:
    # [S-READ-2] order seen through a real mount: the kernel's read-ahead requests arrive
    # concurrently, so 12-15 can come before 10 and 11
    st = ReadState()
    requested: list[tuple[int, int]] = []
    for idx in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 10, 11, 16, 17]:
        assert st.advance(idx, idx, max_window=128, min_window=4), idx
        got = st.wanted(1024, 8)
        if got is not None:
            requested.append(got)
    assert st.window == 128
    # what was asked for is one increasing run with no gap and no overlap
    flat = [i for a, b in requested for i in range(a, b + 1)]
    assert flat == list(range(flat[0], flat[-1] + 1))
    assert flat[0] <= 2 and flat[-1] >= 17 + 64  # read 0 and 1 are demand reads


def test_a_jump_outside_the_band_closes_the_window() -> None:
    st = ReadState()
    for idx in range(6):
        st.advance(idx, idx, max_window=64, min_window=4)
    st.wanted(1000, 1)
    assert st.window > 0
    assert not st.advance(500, 500, max_window=64)  # random read far ahead
    assert st.wanted(1000, 1) is None
    assert not st.advance(3, 3, max_window=64)  # and far behind
    # a new stream from there grows again
    assert st.advance(4, 4, max_window=64, min_window=4)


def test_the_first_read_counts_as_sequential_only_at_the_start() -> None:
    st = ReadState()
    assert not st.advance(10, 10, max_window=64, min_window=4)
    st2 = ReadState()
    assert st2.advance(0, 0, max_window=64, min_window=4)
    assert st2.wanted(100, 1) == (1, 4)


def test_wanted_waits_for_a_worthwhile_request_except_at_the_end() -> None:
    st = ReadState()
    st.advance(0, 0, max_window=64, min_window=4)
    assert st.wanted(100, 16) is None  # only 4 chunks missing: wait for more
    st.advance(1, 1, max_window=64, min_window=4)  # window 8
    st.advance(2, 2, max_window=64, min_window=4)  # window 16
    assert st.wanted(100, 16) == (3, 18)
    end = ReadState()
    end.advance(0, 0, max_window=64, min_window=4)
    assert end.wanted(3, 16) == (1, 2)  # the file ends: ask for the rest
