"""This node's lease in the database (docs/operations.md, "Nodes and leases").

Joined at start, renewed every quarter of its length on a connection of its own (never queued
behind the ledger writer). While it holds its lease, the node judges the others: one whose lease
expired is declared lost and its sessions are ended. It judges every quarter of a lease, and
also just after the first other lease runs out, so that a node that died is declared lost (and
its tenants' slots freed) a lease after its last renewal, not up to a quarter later. A renewal
that finds the lease taken means this node was declared lost: `on_lost` stops its sessions,
then the node joins anew.
"""

from __future__ import annotations

import logging
import socket
import time

import anyio
from sqlmodel import Session

from meshrt.shared.logs import one_line
from meshrt.storage import db
from meshrt.storage import ledger

log = logging.getLogger("meshrt.supervisor")

JUDGE_SLACK_S = 0.02  # judged this long after a lease's end: it must have passed on the database's clock


def _judge(session, node: str, held_since: float, ttl: float):
    return ledger.reap_lost_nodes(session, node, held_since, ttl), ledger.next_lease_expiry(session, node)


class NodeLease:
    def __init__(self, db_url: str, db_timeout_s: float, node: str, ttl: float, metrics):
        self.engine = db.make_engine(db_url, db_timeout_s, pool_size=1)
        self.node, self.ttl, self.metrics = node, ttl, metrics
        self.lease: ledger.Lease | None = None
        self.valid_until = 0.0  # monotonic: ours until then, as far as this node can tell
        self.held_since = 0.0  # the database's clock: since when this node has held it unbroken
        self.stopping = False
        self._one_at_a_time = anyio.Lock()

    @property
    def valid(self) -> bool:
        return time.monotonic() <= self.valid_until

    def _transaction(self, call, *args):
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            return call(session, *args)

    async def _run(self, call, *args, deadline_s: float | None = None):
        # one statement at a time: renewing and judging share one pooled connection (two at
        # once would leave the node holding a second one)
        with anyio.fail_after(deadline_s):
            async with self._one_at_a_time:
                return await anyio.to_thread.run_sync(self._transaction, call, *args, abandon_on_cancel=True)

    def _took(self, lease: ledger.Lease, sent_at: float, fresh: bool) -> None:
        if fresh or sent_at > self.valid_until:
            self.held_since = lease.now  # the chain of renewals (re)starts here
        self.lease = lease
        self.valid_until = sent_at + self.ttl

    async def join(self, until_done) -> None:
        """Take the lease for a new incarnation; `until_done` retries while the database refuses."""
        began = time.monotonic()
        lease = await until_done(
            "join the node table", self._run, ledger.join_node, self.node, socket.gethostname(), self.ttl
        )
        self._took(lease, began, fresh=True)
        if lease.was_lost:
            log.warning("this node was declared lost while it was away; its spools amend those records")

    async def hold(self, on_lost, until_done) -> None:
        """Renew and judge until stopping."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._judge)
            await self._renew(on_lost, until_done)
            tg.cancel_scope.cancel()

    async def _renew(self, on_lost, until_done) -> None:
        """Renew until stopping (a renewal racing the node's own leave means nothing)."""
        while not self.stopping:
            await anyio.sleep(self.ttl / 4)
            sent_at = time.monotonic()
            try:
                lease = await self._run(
                    ledger.renew_lease, self.node, self.lease.incarnation, self.ttl, deadline_s=self.ttl / 2
                )
            except Exception as exc:  # noqa: BLE001 - the database is unreachable: try again soon
                log.warning("node lease not renewed", extra={"fields": {"error": one_line(exc)}})
                continue
            if self.stopping:
                return
            if lease is None:
                log.error("this node's lease was taken: it had been declared lost; ending its sessions")
                await on_lost()
                await self.join(until_done)
                continue
            self._took(lease, sent_at, fresh=False)

    async def _judge(self) -> None:
        """Judge the other nodes every quarter of a lease, or sooner: just after the first of
        their leases runs out (a live node renews it long before)."""
        while not self.stopping:
            wait = self.ttl / 4
            if self.valid:  # a node unsure of its own lease judges nobody
                first_expiry = await self._judge_others()
                if first_expiry is not None:  # not sooner than a twentieth of a lease, whatever it says
                    wait = min(wait, max(first_expiry + JUDGE_SLACK_S, self.ttl / 20))
            await anyio.sleep(wait)

    async def _judge_others(self) -> float | None:
        """End the sessions of nodes whose lease expired; returns the seconds until the next
        other lease would expire (None: no other node, or the database did not answer)."""
        try:
            reaped, first_expiry = await self._run(_judge, self.node, self.held_since, self.ttl)
        except Exception as exc:  # noqa: BLE001 - next round
            log.warning("could not check other nodes' leases", extra={"fields": {"error": one_line(exc)}})
            return None
        for lost in reaped:
            log.warning(
                "node lost: its lease expired; its sessions were ended",
                extra={"fields": {"node": lost.node_id, "sessions": len(lost.sessions)}},
            )
            self.metrics.inc("meshrt_nodes_reaped_total")
        return first_expiry

    async def leave(self) -> None:
        """A clean stop: mark the node left (if the database answers within 2 s; else it expires)."""
        self.stopping = True
        try:
            await self._run(ledger.leave_node, self.node, self.lease.incarnation, deadline_s=2)
        except Exception:  # noqa: BLE001 - the lease then simply expires
            log.warning("could not mark this node as left")
