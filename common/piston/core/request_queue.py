"""Waiting queues: FCFS, ordered by a key (priority), and per client (fair), behind one interface.

The scheduler only calls the methods of ``RequestQueue``. Which queue a step uses is
the scheduling policy's choice (``piston.core.policies``).
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Callable, Hashable, Iterable, Iterator

from piston.core.request import Request


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
        """Remove one queued request (cheap for the head); ValueError if absent."""

    def remove_requests(self, requests: Iterable[Request]) -> None:
        """Remove several queued requests."""
        for request in requests:
            self.remove(request)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]:
        """The queued requests, in no guaranteed order for non-FCFS policies."""

    def in_order(self) -> Iterator[Request]:
        """The requests in the order ``pop`` would return them (FCFS: iteration order)."""
        return iter(self)

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
        if self._queue and self._queue[0] is request:
            self._queue.popleft()
        else:
            self._queue.remove(request)

    def remove_requests(self, requests: Iterable[Request]) -> None:
        # One pass instead of one O(n) removal per request.
        drop = set(map(id, requests))
        self._queue = deque(r for r in self._queue if id(r) not in drop)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


def priority_key(request: Request) -> tuple[int, float]:
    """vLLM's priority order: lower ``priority`` first, then earlier arrival."""
    return (request.priority, request.arrival_time)


class PriorityRequestQueue(RequestQueue):
    """Smallest ``key(request)`` first (default: ``priority_key``); ties in insertion order."""

    def __init__(self, key: Callable[[Request], Any] = priority_key) -> None:
        self.key = key
        self._heap: list[tuple[Any, int, Request]] = []
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (self.key(request), next(self._counter), request))

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[2]

    def peek(self) -> Request:
        return self._heap[0][2]

    def prepend(self, request: Request) -> None:
        # A preempted request keeps its key (priority, arrival time), so it sorts ahead
        # of newer requests of equal priority anyway.
        self.add(request)

    def remove(self, request: Request) -> None:
        if self._heap and self._heap[0][2] is request:
            heapq.heappop(self._heap)
            return
        for i, entry in enumerate(self._heap):
            if entry[2] is request:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return
        raise ValueError(f"request {request.request_id!r} is not in the waiting queue")

    def remove_requests(self, requests: Iterable[Request]) -> None:
        drop = set(map(id, requests))
        self._heap = [e for e in self._heap if id(e[2]) not in drop]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[2] for entry in self._heap)

    def in_order(self) -> Iterator[Request]:
        return (entry[2] for entry in sorted(self._heap, key=lambda e: (e[0], e[1])))


class ClientRequestQueue(RequestQueue):
    """One FCFS queue per client (``Request.client_id``); serves the client ranked first.

    ``client_rank(client_id)`` is evaluated on every ``peek``/``pop``, so the order can
    follow state that changes within a step (the fair policy's shares). Ties, and the
    default rank, go to the client whose head request arrived first.
    """

    def __init__(self, client_rank: Callable[[Hashable], Any] | None = None) -> None:
        self.client_rank = client_rank
        self.clients: dict[Hashable, deque[Request]] = {}
        self._len = 0

    def _best(self) -> deque[Request]:
        if not self.clients:
            raise IndexError("peek from an empty waiting queue")
        rank = self.client_rank
        if rank is None:
            return min(self.clients.values(), key=lambda q: q[0].arrival_time)
        best = min(self.clients, key=lambda c: (rank(c), self.clients[c][0].arrival_time))
        return self.clients[best]

    def add(self, request: Request) -> None:
        self.clients.setdefault(request.client_id, deque()).append(request)
        self._len += 1

    def prepend(self, request: Request) -> None:
        self.clients.setdefault(request.client_id, deque()).appendleft(request)
        self._len += 1

    def peek(self) -> Request:
        return self._best()[0]

    def pop(self) -> Request:
        request = self._best()[0]
        self.remove(request)
        return request

    def remove(self, request: Request) -> None:
        queue = self.clients.get(request.client_id)
        if queue is None:
            raise ValueError(f"request {request.request_id!r} is not in the waiting queue")
        if queue[0] is request:
            queue.popleft()
        else:
            queue.remove(request)
        if not queue:
            del self.clients[request.client_id]
        self._len -= 1

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Request]:
        return itertools.chain.from_iterable(self.clients.values())

    def in_order(self) -> Iterator[Request]:
        """Pop order as it stands now: the best-ranked client's head each time."""
        rank = self.client_rank or (lambda c: 0)
        pos = {c: 0 for c in self.clients}
        while pos:
            best = min(pos, key=lambda c: (rank(c), self.clients[c][pos[c]].arrival_time))
            yield self.clients[best][pos[best]]
            pos[best] += 1
            if pos[best] == len(self.clients[best]):
                del pos[best]
