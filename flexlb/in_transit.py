"""This router's reservations on their way to Redis, counted once in its decisions.

A reservation sent when the router saw its worker at pending ``(count, tokens)`` leaves that worker at least at
``(count + 1, tokens + t)`` once Redis has it. Adding it on top of the view would count it twice from the moment the
view applies the script's change-stream entry (the tail may read it before the reply to the call arrives) until the
reply: a burst through one router then saw a hot prefix's worker twice as loaded as it was and spread over the
fleet. As a floor under the view's value it counts once either way; what it may miss meanwhile is another router's
reservation, which the view shows one entry later anyway.
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator, Mapping, Sequence

Load = tuple[int, int]  # (count, tokens) of pending reservations on one worker
Floor = tuple[str, Load]  # a worker and the load it has at least once the reservation is in Redis
EAGER_UP_TO = 32  # workers with floors up to which ``extra`` is a plain dict (a C lookup per worker, not a call)


class InTransit:
    """Floors on the workers' pending load, one per reservation on its way; ``extra`` is what decisions add."""

    def __init__(self) -> None:
        self._floors: dict[str, list[Load]] = {}
        self._highest: dict[str, Load] = {}  # worker -> the highest of its floors (count, tokens apart): per decision

    def add(self, picks: Sequence[tuple[str, int]], pending: Callable[[str], Load]) -> list[Floor]:
        """Reservations of ``(worker_id, tokens)`` sent now, ``pending`` giving the view's load of a worker; returns
        the handle for ``remove``."""
        added = []
        for wid, tokens in picks:
            count, held = self._at_least(wid, pending(wid))
            floor = (count + 1, held + tokens)
            self._floors.setdefault(wid, []).append(floor)
            self._highest[wid] = floor  # at least every floor before it, by construction
            added.append((wid, floor))
        return added

    def remove(self, added: Sequence[Floor]) -> None:
        """The reservations' replies arrived (the caller sets the view from them) or the calls failed."""
        for wid, floor in added:
            floors = self._floors[wid]
            floors.remove(floor)
            if floors:
                # each floor added is above every one before it (add() starts from the highest), so the last is
                self._highest[wid] = floors[-1]
            else:
                del self._floors[wid], self._highest[wid]

    def extra(self, pending: Callable[[str], Load]) -> Mapping[str, Load]:
        """worker id -> what its floors add to the view's load ``pending(worker_id)``, where they add anything: a
        dict while few workers have floors (a decision may look at each of them), else worked out per worker asked
        (a decision in a large fleet looks at a few)."""
        lazy = ExtraLoad(self._highest, pending)
        return lazy if len(self._highest) > EAGER_UP_TO else lazy.as_dict()

    def __bool__(self) -> bool:
        return bool(self._floors)

    def _at_least(self, wid: str, base: Load) -> Load:
        highest = self._highest.get(wid)
        if highest is None:
            return base
        return max(base[0], highest[0]), max(base[1], highest[1])


def _above(floor: Load, base: Load) -> Load | None:
    """What ``floor`` adds to the view's ``base`` load, or None when it adds nothing."""
    if floor[0] > base[0] or floor[1] > base[1]:
        return max(floor[0] - base[0], 0), max(floor[1] - base[1], 0)
    return None


class ExtraLoad(Mapping[str, Load]):
    """``InTransit.extra``: worked out per worker when asked, as a decision asks about a few workers of many while
    a busy router has reservations in transit on dozens. Valid until the next add or remove."""

    __slots__ = ("_highest", "_pending")

    def __init__(self, highest: Mapping[str, Load], pending: Callable[[str], Load]) -> None:
        self._highest, self._pending = highest, pending

    def get(self, worker_id: str, default: Load | None = None) -> Load | None:  # type: ignore[override]
        floor = self._highest.get(worker_id)
        extra = None if floor is None else _above(floor, self._pending(worker_id))
        return default if extra is None else extra

    def as_dict(self) -> dict[str, Load]:
        """Every worker's, at once."""
        pending = self._pending
        return {wid: extra for wid, floor in self._highest.items() if (extra := _above(floor, pending(wid)))}

    def items(self) -> ItemsView[str, Load]:  # type: ignore[override]
        return self.as_dict().items()  # each worker's worked out once, not by __iter__ and then __getitem__

    def __getitem__(self, worker_id: str) -> Load:
        extra = self.get(worker_id)
        if extra is None:
            raise KeyError(worker_id)
        return extra

    def __iter__(self) -> Iterator[str]:
        return (wid for wid in self._highest if self.get(wid) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        return bool(self._highest)  # a quick "maybe": get() says for each worker
