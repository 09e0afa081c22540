"""Reservations on their way to Redis count once, whether or not the view has applied them yet."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flexlb.in_transit import EAGER_UP_TO, InTransit


def test_reservations_on_their_way_are_floors_under_the_view() -> None:
    view = {"w": (0, 0)}
    transit = InTransit()
    first = transit.add([("w", 100)], view.__getitem__)
    second = transit.add([("w", 50)], view.__getitem__)
    assert transit.extra(view.__getitem__) == {"w": (2, 150)}  # neither in the view yet
    view["w"] = (1, 100)  # the view applied the first one's stream entry
    assert transit.extra(view.__getitem__) == {"w": (1, 50)}
    view["w"] = (2, 150)  # and the second's
    assert transit.extra(view.__getitem__) == {}
    transit.remove(first)
    transit.remove(second)
    assert not transit and transit.extra(view.__getitem__) == {}


def test_a_release_seen_meanwhile_does_not_hide_a_reservation_on_its_way() -> None:
    view = {"w": (3, 300)}
    transit = InTransit()
    added = transit.add([("w", 10)], view.__getitem__)
    view["w"] = (2, 200)  # another request on w was released meanwhile
    assert transit.extra(view.__getitem__) == {"w": (2, 110)}  # at least what it was sent on: conservative
    transit.remove(added)
    assert transit.extra(view.__getitem__) == {}


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 500), st.integers(0, 10)), max_size=40))
def test_what_decisions_add_is_the_highest_floor_still_on_its_way(steps: list[tuple[bool, int, int, int]]) -> None:
    """Any order of sends and replies: ``extra`` is the highest of the floors still out (counts and tokens apart)."""
    view = {"w": (0, 0)}
    transit = InTransit()
    out: list[list[tuple[str, tuple[int, int]]]] = []
    for send, count, tokens, which in steps:
        view["w"] = (count, tokens * 10)  # the view moves as it likes meanwhile (other routers, releases)
        if send or not out:
            out.append(transit.add([("w", tokens)], view.__getitem__))
        else:
            transit.remove(out.pop(which % len(out)))
        floors = [floor for handle in out for _, floor in handle]
        want = {}
        if floors:
            top = (max(f[0] for f in floors), max(f[1] for f in floors))
            if top[0] > view["w"][0] or top[1] > view["w"][1]:
                want = {"w": (max(top[0] - view["w"][0], 0), max(top[1] - view["w"][1], 0))}
        assert transit.extra(view.__getitem__) == want


@given(st.integers(0, 3 * EAGER_UP_TO), st.integers(0, 2))
def test_a_large_fleet_gets_the_same_load_worked_out_per_worker(workers: int, seen: int) -> None:
    """Past EAGER_UP_TO workers with floors, ``extra`` answers per worker asked: the same values as the dict."""
    view = {f"w{i}": (0, 0) for i in range(workers)}
    transit = InTransit()
    transit.add([(wid, 10) for wid in view], view.__getitem__)
    transit.add([(wid, 5) for wid in list(view)[::2]], view.__getitem__)
    for wid in list(view)[::3]:
        view[wid] = (seen, 10 * seen)  # the view applied some of them
    extra = transit.extra(view.__getitem__)
    want = {}
    for i, wid in enumerate(view):
        top = (2, 15) if i % 2 == 0 else (1, 10)
        base = view[wid]
        if top[0] > base[0] or top[1] > base[1]:
            want[wid] = (max(top[0] - base[0], 0), max(top[1] - base[1], 0))
    assert dict(extra) == want and dict(extra.items()) == want and len(extra) == len(want)
    assert bool(extra) or not want  # empty is a sure 'none'; a lazy one may say 'maybe'
    assert all(extra.get(wid) == want.get(wid) for wid in [*view, "unknown"])
