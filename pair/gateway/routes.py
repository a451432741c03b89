"""gateway.sock's methods: the wire types and the handlers that map them onto the services.

One rule for how a handler runs: a method whose transaction may queue an
event returns `Deferred` (`_submit_then_wake_delivery`: no task, and the
outbox delivery is woken once the transaction has committed); the others
are coroutines around `await self._run(...)`; `health` is inline.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from msgspec import Meta, Struct

from pair import __version__
from pair.gateway import contacts, invites
from pair.gateway.codes import CodeHasher
from pair.gateway.db import Database
from pair.gateway.delivery import Delivery
from pair.gateway.inbound import Inbound, inbound
from pair.gateway.invites import GuessLimits, Redemption, Sender
from pair.gateway.link import AssistantLink
from pair.gateway.one_time_migrations import MigrationRunner
from pair.gateway.outbox import queued_through
from pair.gateway.records import Channel, Contact, Invite
from pair.protocol import trace
from pair.protocol.deferred import Deferred
from pair.protocol.dispatch import NoParams, Router
from pair.protocol.errors import InvalidParams
from pair.protocol.health import DbInfo, Health, health_of
from pair.protocol.hello import ProtocolRange
from pair.protocol.metrics import ProtocolMetrics
from pair.runtime.backup import BackupStats, Snapshotter, method_of
from pair.runtime.sqlite import Conn, Job

T = TypeVar("T")

log = logging.getLogger("gateway.calls")

# `(?!.*\n)`: in Python's regex `$` also matches before a final newline, so
# "telegram\n" would pass `^...$` alone; the lookahead means the same in the
# JSON Schema (ECMA) dialect rpc.discover publishes.
ChannelName = Annotated[str, Meta(pattern=r"^(?!.*\n)[a-z0-9_-]{1,32}$")]
Code = Annotated[str, Meta(pattern=r"^(?!.*\n)[0-9]{6}$")]
RecordId = Annotated[str, Meta(min_length=1, max_length=200)]
ExternalId = Annotated[str, Meta(min_length=1, max_length=256)]
Limit = Annotated[int, Meta(ge=1, le=500)]
Cursor = Annotated[str, Meta(max_length=400)]
Role = Annotated[str, Meta(pattern=r"^(?!.*\n)[a-z][a-z0-9_-]{0,31}$")]


class ContactsCreateParams(Struct, forbid_unknown_fields=True, rename="camel"):
    display_name: Annotated[str, Meta(min_length=1, max_length=200)]
    role: Role = "contact"
    principal_id: RecordId | None = None


class IdParams(Struct, forbid_unknown_fields=True):
    id: RecordId


class ContactsListParams(Struct, forbid_unknown_fields=True):
    limit: Limit = 100
    cursor: Cursor | None = None


class InvitesCreateParams(Struct, forbid_unknown_fields=True, rename="camel"):
    contact_id: RecordId
    source_channel: ChannelName
    max_uses: Annotated[int, Meta(ge=1, le=1000)] = 1
    ttl_seconds: Annotated[int, Meta(ge=1, le=30 * 86400)] = 86400
    note: Annotated[str, Meta(max_length=1000)] | None = None


class InvitesRedeemParams(Struct, forbid_unknown_fields=True, rename="camel"):
    source_channel: ChannelName
    code: Code
    external_user_id: ExternalId | None = None
    external_chat_id: ExternalId | None = None
    address: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    display_name: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


class InvitesListParams(Struct, forbid_unknown_fields=True, rename="camel"):
    status: Literal["active", "redeemed", "revoked", "expired"] | None = None
    source_channel: ChannelName | None = None
    contact_id: RecordId | None = None
    limit: Limit = 100
    cursor: Cursor | None = None


class ChannelInboundParams(Struct, forbid_unknown_fields=True, rename="camel"):
    source_channel: ChannelName
    text: Annotated[str, Meta(max_length=65536)]
    external_user_id: ExternalId | None = None
    external_chat_id: ExternalId | None = None


class ContactResult(Struct):
    contact: Contact


class ContactDetail(Struct):
    contact: Contact
    channels: list[Channel]


class ContactList(Struct, rename="camel"):
    contacts: list[Contact]
    next_cursor: str | None


class Deleted(Struct):
    deleted: bool


class InviteCreated(Struct):
    invite: Invite
    code: str


class InviteResult(Struct):
    invite: Invite


class InviteList(Struct, rename="camel"):
    invites: list[Invite]
    next_cursor: str | None


class LinkInfo(Struct, rename="camel"):
    """The link to the assistant; `state` "incompatible" when the assistant's release is
    outside the skew window (`lastError` says why and which side to upgrade)."""

    state: str
    since: int
    last_error: str | None
    # What the assistant said of itself on the current connection (`pair.hello`).
    version: str | None = None
    protocol: ProtocolRange | None = None
    capabilities: list[str] | None = None


class OutboxInfo(Struct, rename="camel"):
    pending: int
    dead: int
    oldest_age_ms: int | None
    delivered_total: int
    last_error: str | None


class MigrationsInfo(Struct, rename="camel"):
    pending: int
    failed: int
    failed_key: str | None
    last_error: str | None


class OutboxMetrics(Struct, rename="camel"):
    pending: int
    dead: int
    oldest_age_seconds: float | None
    delivered_total: int


class GatewayMetrics(ProtocolMetrics, kw_only=True):
    db_errors: dict[str, int]
    invite_redemptions: dict[str, int]
    outbox: OutboxMetrics
    backup: BackupStats


class HealthResult(Health, kw_only=True):
    assistant: LinkInfo
    outbox: OutboxInfo
    migrations: MigrationsInfo


class GatewayRoutes:
    """The handlers of gateway.sock."""

    def __init__(
        self,
        db: Database,
        hasher: Callable[[], CodeHasher],
        limits: GuessLimits,
        link: AssistantLink,
        delivery: Delivery,
        migrations: MigrationRunner,
        snapshots: Snapshotter,
    ) -> None:
        self.db = db
        self.snapshots = snapshots
        self._hasher = hasher
        self.limits = limits
        self.link = link
        self.delivery = delivery
        self.migrations = migrations
        self.started = time.monotonic()
        self.pid = os.getpid()
        self.router = Router("gatewayd", __version__)
        add = self.router.add
        add("health", self.health, inline=True)
        add("contacts_create", self.contacts_create)
        add("contacts_get", self.contacts_get)
        add("contacts_list", self.contacts_list)
        add("contacts_delete", self.contacts_delete)
        add("invites_create", self.invites_create)
        add("invites_redeem", self.invites_redeem, observe=self._count_redemption)
        add("invites_revoke", self.invites_revoke)
        add("invites_list", self.invites_list)
        add("channel_inbound", self.channel_inbound, observe=self._count_inbound_redemption)
        add("metrics", self.metrics, inline=True)
        add("backup", method_of(snapshots), thread=True, admin=True)
        # By outcome: the result's "redeemed" / "already_member", else the errorCode.
        self.redemptions: Counter[str] = Counter()

    def metrics(self, params: NoParams) -> GatewayMetrics:
        """Calls by method and outcome, their durations, connections, database errors,
        redemptions by outcome and the outbox (`pairctl metrics` prints them for Prometheus)."""
        delivery = self.delivery
        oldest_ms = delivery.backlog.oldest_age_ms()
        return self.router.protocol_metrics(
            GatewayMetrics,
            db_errors=self.db.failure_counts(),
            invite_redemptions=dict(self.redemptions),
            outbox=OutboxMetrics(
                delivery.pending,
                delivery.dead,
                None if oldest_ms is None else oldest_ms / 1000,
                delivery.delivered_total,
            ),
            backup=self.snapshots.stats,
        )

    def _count_redemption(self, result: Any, error_code: str | None) -> None:
        outcome = error_code or getattr(result, "outcome", None)
        if outcome is not None:
            self.redemptions[outcome] += 1

    def _count_inbound_redemption(self, result: Any, error_code: str | None) -> None:
        """A message that was a redemption: "redeemed", or a refusal only redeeming gives."""
        if error_code is None:
            if getattr(result, "outcome", None) == "redeemed":
                self.redemptions["redeemed"] += 1
        elif error_code.startswith("INVITE_") or error_code == "RATE_LIMITED":
            self.redemptions[error_code] += 1

    async def _run(self, job: Callable[..., T], **kwargs: object) -> T:
        return await self.db.run(functools.partial(job, **kwargs))

    def _submit_then_wake_delivery(
        self, job: Callable[..., T], said: Callable[[T], str | None], **kwargs: object
    ) -> Job[T]:
        """A job whose transaction may queue an event; delivery is woken once it commits,
        and `said(result)` is logged (at info, of the call's trace).

        The job runs in the call's span, or the first of a new trace: the events it
        queues are named after it (`outbox.queue_event`), so that their delivery and
        storing, however much later, are logged under the same trace."""
        span = trace.current_or_new()
        bound = functools.partial(job, **kwargs)
        submitted = self.db.submit(functools.partial(_and_queued_through, job=bound, span=span))
        return submitted.map(functools.partial(self._wake_delivery, said, span))

    def _wake_delivery(
        self, said: Callable[[T], str | None], span: trace.Span, outcome: tuple[T, int]
    ) -> T:
        result, through = outcome
        self.delivery.wake(through)
        line = said(result)
        if line is not None:
            log.info("%s", line, extra={"span": span})
        return result

    def health(self, params: NoParams) -> HealthResult:
        """Liveness, assistant link, outbox backlog, migrations; never calls the assistant.

        `status` is "degraded" while gateway.db's writes fail for its own reason
        (full, unreachable, corrupt): `db.lastError` says which."""
        migrations = self.migrations.state
        delivery = self.delivery
        db = DbInfo(self.db.path, self.db.schema_version, self.db.write_health.last_error)
        return health_of(
            HealthResult,
            pid=self.pid,
            started=self.started,
            db=db,
            assistant=_link_info(self.link),
            outbox=OutboxInfo(
                delivery.pending,
                delivery.dead,
                delivery.backlog.oldest_age_ms(),
                delivery.delivered_total,
                delivery.last_error,
            ),
            migrations=MigrationsInfo(
                pending=len(migrations.pending),
                failed=1 if migrations.failed else 0,
                failed_key=migrations.failed,
                last_error=migrations.last_error if migrations.failed else None,
            ),
        )

    def contacts_create(self, params: ContactsCreateParams) -> Deferred[ContactResult]:
        """Create a contact (queues `contacts_changed`)."""
        return self._submit_then_wake_delivery(
            contacts.create_contact,
            lambda contact: f"contact {contact.id} created",
            display_name=params.display_name,
            role=params.role,
            principal_id=params.principal_id,
        ).map(ContactResult)

    async def contacts_get(self, params: IdParams) -> ContactDetail:
        """A contact and its channels."""
        contact, channels = await self._run(contacts.get_contact, contact_id=params.id)
        return ContactDetail(contact, channels)

    async def contacts_list(self, params: ContactsListParams) -> ContactList:
        """Contacts in id order, a page at a time; pass `nextCursor` back for the next page."""
        found, next_cursor = await self._run(
            contacts.list_contacts, limit=params.limit, cursor=params.cursor
        )
        return ContactList(found, next_cursor)

    def contacts_delete(self, params: IdParams) -> Deferred[Deleted]:
        """Delete a contact with its channels and invites (queues `contacts_changed`)."""
        deleted = self._submit_then_wake_delivery(
            contacts.delete_contact, lambda _: f"contact {params.id} deleted", contact_id=params.id
        )
        return deleted.map(lambda _: Deleted(True))

    async def invites_create(self, params: InvitesCreateParams) -> InviteCreated:
        """A new invite and its 6-digit code; the code is shown here only, never again."""
        invite, code = await self._run(
            invites.create_invite,
            hasher=self._hasher(),
            contact_id=params.contact_id,
            channel=params.source_channel,
            max_uses=params.max_uses,
            ttl_seconds=params.ttl_seconds,
            note=params.note,
        )
        return InviteCreated(invite, code)

    def invites_redeem(self, params: InvitesRedeemParams) -> Deferred[Redemption]:
        """Redeem a code for a sender in one local transaction; works with the assistant down."""
        sender = Sender(
            params.source_channel,
            params.external_user_id,
            params.external_chat_id,
            params.address,
            params.display_name,
        )
        return self._submit_then_wake_delivery(
            invites.redeem,
            _redeemed,
            hasher=self._hasher(),
            limits=self.limits,
            sender=sender,
            code=params.code,
        )

    async def invites_revoke(self, params: IdParams) -> InviteResult:
        """Revoke an invite; revoking one that is already over changes nothing."""
        return InviteResult(await self._run(invites.revoke, invite_id=params.id))

    async def invites_list(self, params: InvitesListParams) -> InviteList:
        """Invites in id order, filtered; never a code or a hash."""
        found, next_cursor = await self._run(
            invites.list_invites,
            status=params.status,
            channel=params.source_channel,
            contact_id=params.contact_id,
            limit=params.limit,
            cursor=params.cursor,
        )
        return InviteList(found, next_cursor)

    def channel_inbound(self, params: ChannelInboundParams) -> Deferred[Inbound]:
        """A message from a channel: a known sender is touched, an unknown one's code redeemed."""
        if not (params.external_user_id or params.external_chat_id):
            raise InvalidParams(
                "externalUserId or externalChatId is required", path="$.externalUserId"
            )
        sender = Sender(params.source_channel, params.external_user_id, params.external_chat_id)
        return self._submit_then_wake_delivery(
            inbound,
            _inbound_redeemed,
            hasher=self._hasher(),
            limits=self.limits,
            sender=sender,
            text=params.text,
        )


def _and_queued_through(conn: Conn, job: Callable[[Conn], T], span: trace.Span) -> tuple[T, int]:
    token = trace.enter(span)
    try:
        return job(conn), queued_through(conn)
    finally:
        trace.leave(token)


def _redeemed(result: Redemption) -> str:
    return (
        f"invite {result.invite_id} {result.outcome.replace('_', ' ')}:"
        f" contact {result.contact_id}, channel {result.channel_id}"
    )


def _inbound_redeemed(result: Inbound) -> str | None:
    if result.outcome != "redeemed":
        return None
    return (
        f"invite {result.invite_id} redeemed by a message: contact {result.contact_id},"
        f" channel {result.channel_id}"
    )


def _link_info(link: AssistantLink) -> LinkInfo:
    status, peer = link.status, link.peer
    if peer is None:
        return LinkInfo(status.state, status.since, status.last_error)
    return LinkInfo(
        status.state,
        status.since,
        status.last_error,
        peer.version,
        peer.protocol,
        sorted(peer.capabilities),
    )
