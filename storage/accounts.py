"""Account, key and top-up operations: the one implementation behind the CLI and the admin API."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from sqlalchemy import bindparam
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import update
from sqlalchemy.orm import aliased
from sqlmodel import Session
from sqlmodel import select

from meshrt.shared.ids import new_id
from meshrt.shared.money import Money

from .db import LIVE_STATES
from .db import Account
from .db import ApiKey
from .db import LedgerEntry
from .db import SessionRecord
from .db import SessionState
from .db import hash_key
from .db import key_display
from .db import new_key
from .db import utcnow

# The key and its account in one statement: the realtime upgrade (which also locks the account
# row, serialising admissions of one account across nodes) and the HTTP API use the same rule.
# An ephemeral key brings its parent's row: the parent's revocation and token cap are its own.
_Parent = aliased(ApiKey, name="parent_key")
_KEY_AND_ACCOUNT = (
    select(
        ApiKey.key_hash,
        ApiKey.id.label("api_key_id"),
        func.coalesce(_Parent.token_cap, ApiKey.token_cap).label("token_cap"),
        ApiKey.revoked_at,
        ApiKey.parent_key_id,
        ApiKey.expires_at,
        ApiKey.session_config,
        _Parent.revoked_at.label("parent_revoked_at"),
        Account.id.label("account_id"),
        Account.active,
        Account.balance_pico,
        Account.max_concurrent_sessions,
        Account.session_token_cap,
    )
    .join(Account, Account.id == ApiKey.account_id)
    .outerjoin(_Parent, _Parent.id == ApiKey.parent_key_id)
    .where(ApiKey.key_hash == bindparam("digest"))
)
_KEY_AND_LOCKED_ACCOUNT = _KEY_AND_ACCOUNT.with_for_update(of=Account)

EPHEMERAL_PREFIX = "ek_"


class KeyExpired(Exception):
    """An ephemeral key past its `expires_at`: refused, with a message saying so (the holder
    learns only what it was told when the key was minted)."""

    def __init__(self, expires_at: int):
        self.expires_at = expires_at
        super().__init__(
            f"This ephemeral key (ek_…) expired at {expires_at} (epoch seconds); mint a new one with "
            "POST /v1/realtime/client_secrets."
        )


def usable_key(connection, key: str, *, lock_account: bool = False):
    """The key's row with its account's, or None when the key is unknown, revoked (or minted by a
    key since revoked), or its account disabled — one message for all, so a caller learns nothing
    about which. An expired ephemeral key raises KeyExpired. With `lock_account` the account row
    stays locked until the transaction ends (PostgreSQL; SQLite's BEGIN IMMEDIATE already
    serialises writers)."""
    digest = hash_key(key)
    found = connection.execute(
        _KEY_AND_LOCKED_ACCOUNT if lock_account else _KEY_AND_ACCOUNT, {"digest": digest}
    ).first()
    if (
        found is None
        or not hmac.compare_digest(found.key_hash, digest)
        or found.revoked_at is not None
        or found.parent_revoked_at is not None
        or not found.active
    ):
        return None
    if found.expires_at is not None and time.time() >= found.expires_at:
        raise KeyExpired(found.expires_at)
    return found


# The account's sessions that count against its limit: granted or live (not ended), on any node.
# Admission runs it inside its transaction, after the account row's lock. `!= ENDED`, not
# `IN (granted, live)`: SQLAlchemy renders an IN list's values anew at every execution, which
# was most of an admission's statement time (a cached statement renders once).
OPEN_SESSIONS = (
    select(func.count())
    .select_from(SessionRecord)
    .where(SessionRecord.account_id == bindparam("account_id"), SessionRecord.state != SessionState.ENDED)
)


# A WebRTC call of an account, still running (its worker meters it): what the call's tenant
# may join with a sideband or hang up. Another account's call is not found, exactly as no call.
_LIVE_CALL = select(SessionRecord.id, SessionRecord.model, SessionRecord.node).where(
    SessionRecord.call_id == bindparam("call_id"),
    SessionRecord.account_id == bindparam("account_id"),
    SessionRecord.surface == "webrtc",
    SessionRecord.state != SessionState.ENDED,  # granted or live, as OPEN_SESSIONS
)


def live_call(connection, account_id: str, call_id: str):
    """The row (id, model, node) of the account's running call `call_id`, or None."""
    return connection.execute(_LIVE_CALL, {"call_id": call_id, "account_id": account_id}).first()


def open_sessions(engine, account_id: str) -> int:
    with engine.connect() as connection:
        return connection.execute(OPEN_SESSIONS, {"account_id": account_id}).scalar_one()


class NotFound(LookupError):
    pass


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    plaintext: str  # shown once, never stored


def account_json(account: Account) -> dict:
    return {
        "object": "account",
        "id": account.id,
        "name": account.name,
        "balance": Money(account.balance_pico).usd_str(),
        # held for responses in flight (docs/billing.md, Pre-authorised responses)
        "reserved": Money(account.reserved_pico).usd_str(),
        "available": Money(account.balance_pico - account.reserved_pico).usd_str(),
        "active": account.active,
        "max_concurrent_sessions": account.max_concurrent_sessions,
        "session_token_cap": account.session_token_cap,
        "created_at": int(account.created_at.timestamp()),
    }


def key_json(key: ApiKey) -> dict:
    return {
        "object": "api_key",
        "id": key.id,
        "account_id": key.account_id,
        "name": key.name,
        "display": key.display,
        "token_cap": key.token_cap,
        "created_at": int(key.created_at.timestamp()),
        "revoked_at": int(key.revoked_at.timestamp()) if key.revoked_at else None,
        # ephemeral keys only: the rsk_ key that minted it, and when it stops admitting sessions
        "parent_key_id": key.parent_key_id,
        "expires_at": key.expires_at,
    }


def create_account(
    engine,
    name: str,
    balance: Money = Money(0),
    max_concurrent_sessions: int | None = None,
    session_token_cap: int | None = None,
) -> Account:
    account = Account(
        id=new_id("acct"),
        name=name,
        balance_pico=0,
        max_concurrent_sessions=max_concurrent_sessions,
        session_token_cap=session_token_cap,
    )
    with Session(engine, expire_on_commit=False) as db, db.begin():
        db.add(account)
    if balance.picodollars:
        topup(engine, account.id, balance, note="initial balance")
    return get_account(engine, account.id)


def get_account(engine, account_id: str) -> Account:
    with Session(engine, expire_on_commit=False) as db:
        account = db.get(Account, account_id)
        if account is None:
            raise NotFound(f"no account {account_id!r}")
        db.expunge(account)
        return account


def list_accounts(engine) -> list[Account]:
    with Session(engine, expire_on_commit=False) as db:
        rows = list(db.exec(select(Account).order_by(Account.created_at)).all())
        for row in rows:
            db.expunge(row)
        return rows


def topup(engine, account_id: str, amount: Money, note: str = "") -> Account:
    """Add (or, negative, remove) balance; every change is a ledger entry."""
    with Session(engine, expire_on_commit=False) as db, db.begin():
        result = db.exec(
            update(Account)
            .where(Account.id == account_id)
            .values(balance_pico=Account.balance_pico + amount.picodollars)
        )
        if result.rowcount != 1:
            raise NotFound(f"no account {account_id!r}")
        db.add(
            LedgerEntry(
                account_id=account_id,
                amount_pico=amount.picodollars,
                kind="topup" if amount.picodollars >= 0 else "adjustment",
                note=note,
            )
        )
    return get_account(engine, account_id)


def create_key(engine, account_id: str, name: str = "", token_cap: int | None = None) -> CreatedKey:
    get_account(engine, account_id)
    plaintext = new_key()
    key = ApiKey(
        id=new_id("key"),
        account_id=account_id,
        name=name,
        display=key_display(plaintext),
        key_hash=hash_key(plaintext),
        token_cap=token_cap,
    )
    return _store_key(engine, key, plaintext)


def _store_key(engine, key: ApiKey, plaintext: str) -> CreatedKey:
    """Insert a new key row and return it as stored, with its plaintext (shown once)."""
    with Session(engine, expire_on_commit=False) as db, db.begin():
        db.add(key)
    with Session(engine, expire_on_commit=False) as db:
        key = db.get(ApiKey, key.id)
        db.expunge(key)
    return CreatedKey(key, plaintext)


def create_ephemeral_key(engine, parent, seconds: int, session_config: dict | None) -> CreatedKey:
    """An ek_ key for the account of `parent` (a `usable_key` row of an rsk_ key): it opens
    realtime sessions until `seconds` from now, each with `session_config` applied."""
    plaintext = new_key(EPHEMERAL_PREFIX)
    key = ApiKey(
        id=new_id("key"),
        account_id=parent.account_id,
        name="ephemeral",
        display=key_display(plaintext),
        key_hash=hash_key(plaintext),
        parent_key_id=parent.api_key_id,
        expires_at=int(time.time()) + seconds,
        session_config=session_config,
    )
    return _store_key(engine, key, plaintext)


def prune_ephemeral_keys(engine, expired_before: float, limit: int = 1000) -> int:
    """Delete up to `limit` ek_ keys that expired before `expired_before` (epoch seconds) and
    opened no session still running; returns how many went. Each page a browser app serves
    mints one, so a node that kept them all would list millions. Usage records keep the key's
    id: a record outlives its key, as a revoked key's records do."""
    running = (
        select(SessionRecord.id)
        .where(SessionRecord.api_key_id == ApiKey.id, SessionRecord.state.in_(LIVE_STATES))
        .exists()
    )
    stale = (
        select(ApiKey.id)
        .where(ApiKey.parent_key_id.is_not(None), ApiKey.expires_at < int(expired_before), ~running)
        .limit(limit)
    )
    with engine.begin() as connection:
        return connection.execute(delete(ApiKey).where(ApiKey.id.in_(stale.scalar_subquery()))).rowcount


def list_keys(engine, account_id: str | None = None) -> list[ApiKey]:
    with Session(engine, expire_on_commit=False) as db:
        query = select(ApiKey).order_by(ApiKey.created_at)
        if account_id:
            query = query.where(ApiKey.account_id == account_id)
        rows = list(db.exec(query).all())
        for row in rows:
            db.expunge(row)
        return rows


def set_active(engine, account_id: str, active: bool) -> Account:
    """Deactivate (or reactivate) an account: a deactivated one is refused at connect and over
    the API, and its live sessions end on every node (`account_deactivated`)."""
    with Session(engine, expire_on_commit=False) as db, db.begin():
        result = db.exec(update(Account).where(Account.id == account_id).values(active=active))
        if result.rowcount != 1:
            raise NotFound(f"no account {account_id!r}")
    return get_account(engine, account_id)


def revoke_key(engine, key_id: str) -> ApiKey:
    with Session(engine, expire_on_commit=False) as db, db.begin():
        key = db.get(ApiKey, key_id)
        if key is None:
            raise NotFound(f"no key {key_id!r}")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
    with Session(engine, expire_on_commit=False) as db:
        key = db.get(ApiKey, key_id)
        db.expunge(key)
        return key
