"""Waiting-queue policies: FCFS and priority, behind one small interface.

The scheduler only calls the methods of ``RequestQueue``; a new policy is a new
subclass plus a line in ``create_request_queue``.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import deque
from typing import Iterable, Iterator

from piston.request import Request


class RequestQueue(ABC):
    """Requests waiting to be scheduled, in the order the policy wants them served."""

    @abstractmethod
    def add(self, request: Request) -> None:
        """Queue a new request."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return the next request to serve; IndexError when empty."""

    @abstractmethod
    def peek(self) -> Request:
        """The next request to serve, left in place; IndexError when empty."""

    @abstractmethod
    def prepend(self, request: Request) -> None:
        """Queue a preempted request so that it is served before newer ones."""

    @abstractmethod
    def remove(self, request: Request) -> None:
        """Remove one queued request; ValueError if absent."""

    def remove_requests(self, requests: Iterable[Request]) -> None:
        """Remove several queued requests."""
        for request in requests:
            self.remove(request)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]:
        """The queued requests, in no guaranteed order for non-FCFS policies."""

    def __bool__(self) -> bool:
        return len(self) > 0


class FCFSRequestQueue(RequestQueue):
    """First come, first served; preempted requests go back to the front."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def pop(self) -> Request:
        return self._queue.popleft()

    def peek(self) -> Request:
        return self._queue[0]

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def remove_requests(self, requests: Iterable[Request]) -> None:
        # One pass instead of one O(n) removal per request.
        drop = set(map(id, requests))
        self._queue = deque(r for r in self._queue if id(r) not in drop)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityRequestQueue(RequestQueue):
    """Lowest ``(priority, arrival_time)`` first, as in vLLM; ties in insertion order."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._counter), request))

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def peek(self) -> Request:
        return self._heap[0][3]

    def prepend(self, request: Request) -> None:
        # A preempted request keeps its priority and arrival time, so it sorts ahead of
        # newer requests of equal priority anyway.
        self.add(request)

    def remove(self, request: Request) -> None:
        for i, entry in enumerate(self._heap):
            if entry[3] is request:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return
        raise ValueError(f"request {request.request_id!r} is not in the waiting queue")

    def remove_requests(self, requests: Iterable[Request]) -> None:
        drop = set(map(id, requests))
        self._heap = [e for e in self._heap if id(e[3]) not in drop]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in self._heap)


def create_request_queue(policy: str) -> RequestQueue:
    """An empty waiting queue for ``policy`` ("fcfs" or "priority")."""
    if policy == "fcfs":
        return FCFSRequestQueue()
    if policy == "priority":
        return PriorityRequestQueue()
    raise ValueError(f"Unknown scheduling policy {policy!r}; use 'fcfs' or 'priority'.")
