"""Capacity held for a job while it runs: settled to actual use, or released on failure."""

from __future__ import annotations

from typing import Protocol

from worker.models import CompletionResult


class Reservation(Protocol):
    """Something reserved up front for a job's worst case (budget, tokens, requests)."""

    def settle(self, result: CompletionResult) -> None:
        """The job finished: replace the reservation by what it really used."""
        ...

    def release(self) -> None:
        """The job failed: give everything back."""
        ...


class Reservations:
    """The reservations of one job, settled or released together."""

    def __init__(self) -> None:
        self._held: list[Reservation] = []

    def add(self, reservation: Reservation) -> None:
        """Hold one more reservation."""
        self._held.append(reservation)

    def settle(self, result: CompletionResult) -> None:
        """Settle all, in the order they were made."""
        for reservation in self._held:
            reservation.settle(result)
        self._held.clear()

    def release(self) -> None:
        """Release all, newest first."""
        while self._held:
            self._held.pop().release()
