"""Reservations on their way to Redis count once, whether or not the view has applied them yet."""

from __future__ import annotations

from flexlb.in_transit import InTransit


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
