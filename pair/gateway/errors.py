"""Every errorCode a gateway method answers besides the protocol's and the database's.

The database failures (DB_BUSY, DB_FULL, ...) are `pair.runtime.sqlite.errors`'s,
shared with the assistant.
"""

from __future__ import annotations

from pair.protocol.errors import DomainError


class NotFound(DomainError):
    """No contact or invite has the id the call names."""

    default_status = 404
    default_error_code = "NOT_FOUND"


class InviteMissingIdentity(DomainError):
    """A redemption names neither an externalUserId nor an externalChatId."""

    default_status = 400
    default_error_code = "INVITE_MISSING_IDENTITY"


class InviteInvalid(DomainError):
    """No live invite has this code on this channel (also told to a blocked sender)."""

    default_status = 404
    default_error_code = "INVITE_INVALID"


class InviteRevoked(DomainError):
    default_status = 410
    default_error_code = "INVITE_REVOKED"


class InviteExpired(DomainError):
    default_status = 410
    default_error_code = "INVITE_EXPIRED"


class InviteExhausted(DomainError):
    """Every use of the invite is taken."""

    default_status = 410
    default_error_code = "INVITE_EXHAUSTED"


class RateLimited(DomainError):
    """Too many failed redemptions for the sender or the channel; `data.retryAfterMs` says when."""

    default_status = 429
    default_error_code = "RATE_LIMITED"
    default_retryable = True


class CodeSpaceExhausted(DomainError):
    """No unused 6-digit code was found for a new invite on the channel."""

    default_status = 503
    default_error_code = "CODE_SPACE_EXHAUSTED"
    default_retryable = True
