"""Scheduling policies: who is served first, how the budget is shared, who is preempted.

The Scheduler runs one loop for every policy (``Scheduler.schedule``): it walks the
running requests in the order the policy gives them and, between two of them, admits
the head of the waiting queue whenever the policy ranks it first. A policy answers:

- ``make_queue()``: the waiting queue; its ``peek`` order is the admission order.
- ``begin_step(running, waiting, budget)``: once per step, before anything is served.
  It may reorder ``running`` in place, best first. Victims are always taken from the
  end of that list, past the request being served, so a request already served this
  step is never preempted (its blocks may already be shared by a prefix hit).
- ``waiting_first(head, running_request)``: serve the waiting head before it?
- ``token_limit(request)``: the most tokens the request may take this step, on top of
  the step's budget.
- ``may_preempt(head, victim)``: when the waiting head does not fit (out of KV blocks
  or ``max_num_seqs`` reached), may it preempt ``victim``, the last running request?
- ``on_scheduled(request, num_tokens, admitted)`` and ``on_preempted(request)``:
  bookkeeping.

A custom policy subclasses ``SchedulingPolicy`` and a custom scheduler returns it from
``Scheduler.make_policy``; see ``piston.core.scheduler``.
"""

from __future__ import annotations

import sys
from typing import Hashable

from piston.core.request import Request
from piston.core.request_queue import (
    ClientRequestQueue,
    FCFSRequestQueue,
    PriorityRequestQueue,
    RequestQueue,
    priority_key,
)


class SchedulingPolicy:
    """First come, first served (the default): running requests first, then waiting ones
    in arrival order; preempted requests go back to the front; a waiting request never
    preempts a running one."""

    name = "fcfs"

    def make_queue(self) -> RequestQueue:
        return FCFSRequestQueue()

    def begin_step(self, running: list[Request], waiting: RequestQueue, budget: int) -> None:
        pass

    def waiting_first(self, head: Request, running_request: Request) -> bool:
        return False

    def token_limit(self, request: Request) -> int:
        return sys.maxsize

    def may_preempt(self, head: Request, victim: Request) -> bool:
        return False

    def on_scheduled(self, request: Request, num_tokens: int, admitted: bool) -> None:
        pass

    def on_preempted(self, request: Request) -> None:
        pass


FCFSPolicy = SchedulingPolicy


class PriorityPolicy(SchedulingPolicy):
    """Lowest ``(priority, arrival_time)`` first, running and waiting requests alike.

    A waiting request that does not fit (out of KV blocks or ``max_num_seqs``) preempts,
    by recompute, the worst running requests while they rank strictly below it.
    """

    name = "priority"

    def make_queue(self) -> RequestQueue:
        return PriorityRequestQueue(priority_key)

    def begin_step(self, running: list[Request], waiting: RequestQueue, budget: int) -> None:
        running.sort(key=priority_key)

    def waiting_first(self, head: Request, running_request: Request) -> bool:
        return priority_key(head) < priority_key(running_request)

    def may_preempt(self, head: Request, victim: Request) -> bool:
        return priority_key(head) < priority_key(victim)


class FairPolicy(SchedulingPolicy):
    """Shares each step's token budget and the running slots evenly across clients.

    A client is ``Request.client_id`` (the API's ``user`` field or API key; None is one
    anonymous client). Within a client, requests are served first come, first served.
    Each step:

    1. Tokens: every client with work gets a share of ``max_num_batched_tokens`` by
       max-min fairness (water filling): equal shares, and what a client cannot use
       (its running plus queued requests need fewer tokens; prefix-cache hits are not
       counted) is split equally among the others. A client never gets more than its
       share, so one with 30 queued prompts takes half the budget when one other
       client has work, not all of it. Integer remainders go to the least-served client.
    2. Order: requests are visited round robin across clients (every client's oldest
       running request, then every client's second, ...; a client's next queued request
       counts as its next rank), ties going to the client served the fewest tokens
       recently (an exponentially decayed count, times ``DECAY`` per step).
    3. Slots and blocks: a queued request that does not fit (``max_num_seqs`` reached or
       out of KV blocks) preempts the newest running request of the client holding the
       most running requests, as long as that client would still hold at least as many
       as the requester's afterwards (so two clients never trade a slot back and forth).

    A share that its client cannot use this step (its queued request does not fit) is
    not handed on, so such a step may leave part of the budget unused.
    """

    name = "fair"
    DECAY = 0.95

    def __init__(self) -> None:
        self.served: dict[Hashable, float] = {}  # decayed tokens per client
        self.share_left: dict[Hashable, int] = {}
        self.num_running: dict[Hashable, int] = {}
        self.rank: dict[str, int] = {}  # running request id -> its index within its client

    def make_queue(self) -> RequestQueue:
        return ClientRequestQueue(self._waiting_client_rank)

    def _waiting_client_rank(self, client: Hashable) -> tuple:
        return (self.share_left.get(client, 0) <= 0, self.num_running.get(client, 0),
                self.served.get(client, 0.0))

    def _running_rank(self, request: Request) -> tuple:
        return (self.rank[request.request_id], self.served.get(request.client_id, 0.0))

    def begin_step(self, running: list[Request], waiting: RequestQueue, budget: int) -> None:
        self.served = {c: s * self.DECAY for c, s in self.served.items() if s > 1e-3}
        self.num_running, self.rank = {}, {}
        demand: dict[Hashable, int] = {}
        for request in running:
            client = request.client_id
            self.rank[request.request_id] = self.num_running.get(client, 0)
            self.num_running[client] = self.rank[request.request_id] + 1
            demand[client] = demand.get(client, 0) + request.num_tokens - request.num_computed_tokens
        per_client = waiting.clients.values() if isinstance(waiting, ClientRequestQueue) else [waiting]
        for queue in per_client:
            for request in queue:
                client = request.client_id
                if demand.get(client, 0) >= budget and queue is not waiting:
                    break  # demand past the budget changes no share
                demand[client] = demand.get(client, 0) + request.num_tokens
        self.share_left = self._water_fill(budget, demand)
        running.sort(key=self._running_rank)

    def _water_fill(self, budget: int, demand: dict[Hashable, int]) -> dict[Hashable, int]:
        # Smallest demand first; among equals the least served last, so it gets the remainder.
        clients = sorted(demand, key=lambda c: (demand[c], -self.served.get(c, 0.0)))
        shares, left = {}, budget
        for k, client in enumerate(clients):
            shares[client] = min(demand[client], left // (len(clients) - k))
            left -= shares[client]
        return shares

    def waiting_first(self, head: Request, running_request: Request) -> bool:
        exhausted, *rank = self._waiting_client_rank(head.client_id)
        return not exhausted and tuple(rank) < self._running_rank(running_request)

    def token_limit(self, request: Request) -> int:
        return self.share_left.get(request.client_id, 0)

    def may_preempt(self, head: Request, victim: Request) -> bool:
        return self.num_running.get(victim.client_id, 0) > self.num_running.get(head.client_id, 0) + 1

    def on_scheduled(self, request: Request, num_tokens: int, admitted: bool) -> None:
        client = request.client_id
        self.share_left[client] = self.share_left.get(client, 0) - num_tokens
        self.served[client] = self.served.get(client, 0.0) + num_tokens
        if admitted:
            self.num_running[client] = self.num_running.get(client, 0) + 1

    def on_preempted(self, request: Request) -> None:
        self.num_running[request.client_id] = self.num_running.get(request.client_id, 1) - 1


BUILTIN_POLICIES: dict[str, type[SchedulingPolicy]] = {
    "fcfs": SchedulingPolicy, "priority": PriorityPolicy, "fair": FairPolicy,
}


def make_policy(name: str) -> SchedulingPolicy:
    """The built-in policy ``name``; a ``module:Class`` scheduler starts from FCFS."""
    if name in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[name]()
    if ":" in name or "." in name:
        return SchedulingPolicy()
    raise ValueError(f"Unknown scheduling policy {name!r}; use 'fcfs', 'priority', 'fair', "
                     f"or 'module:Class' naming a Scheduler subclass.")
