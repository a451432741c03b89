"""channel_inbound: a message from a channel, seen by the gateway before anything else."""

from __future__ import annotations

import re

from msgspec import UNSET, Struct, UnsetType

from pair.gateway.codes import CodeHasher
from pair.gateway.contacts import find_sender_channel, touch_channel
from pair.gateway.invites import GuessLimits, Sender, redeem
from pair.runtime.sqlite import Conn

BARE_CODE = re.compile(r"\s*([0-9]{6})\s*")


class Inbound(Struct, rename="camel", omit_defaults=True, gc=False):
    outcome: str
    contact_id: str | UnsetType = UNSET
    channel_id: str | UnsetType = UNSET
    invite_id: str | UnsetType = UNSET


def inbound(
    conn: Conn, hasher: CodeHasher, limits: GuessLimits, sender: Sender, text: str
) -> Inbound:
    """A known sender's stats are touched; an unknown sender's bare code is a redemption."""
    known = find_sender_channel(
        conn, sender.channel, sender.external_user_id, sender.external_chat_id
    )
    if known is not None and known.status == "active" and known.policy != "deny":
        touch_channel(conn, known.id)
        return Inbound("known", known.contact_id, known.id)
    code = BARE_CODE.fullmatch(text)
    if code is None:
        return Inbound("unknown")
    redemption = redeem(conn, hasher, limits, sender, code.group(1))
    return Inbound("redeemed", redemption.contact_id, redemption.channel_id, redemption.invite_id)
