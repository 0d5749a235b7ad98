"""`meshrt`: the operator's one command (docs/operations.md, Commands). Bad arguments and
settings end with one clear line on stderr and exit code 2; a database that cannot be reached,
a state directory that cannot be made, a port in use: one line saying what to do, exit 1."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from meshrt.shared.money import Money
from meshrt.shared.settings import CommandError
from meshrt.shared.settings import SettingsError
from meshrt.shared.settings import load_settings
from meshrt.shared.settings import make_state_dir
from meshrt.shared.settings import port_argument


def _money(raw: str) -> Money:
    try:
        return Money.from_usd(raw)
    except (ValueError, TypeError, ArithmeticError):
        raise argparse.ArgumentTypeError(f"not a USD amount: {raw!r} (e.g. 25 or 0.50)") from None


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {raw!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshrt", description="Metering gateway for the OpenAI Realtime API.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="everything on one machine for a first try")
    dev.add_argument("--port", type=port_argument, default=None)
    dev.add_argument("--state-dir", default=None)

    serve = sub.add_parser("serve", help="production: supervisor + front door + workers")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=port_argument, default=None)
    serve.add_argument(
        "--keep", action="store_true", help="start the supervisor again if it dies, leaving its workers to re-attach"
    )

    # its flags are the simulator's own (`main` hands them over before this parser runs)
    sub.add_parser("sim", help="the OpenAI Realtime upstream simulator (meshrt sim --help)", add_help=False)

    dbp = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    dbp.add_parser("upgrade", help="create / migrate the schema")

    accounts = sub.add_parser("accounts").add_subparsers(dest="accounts_command", required=True)
    create = accounts.add_parser("create")
    create.add_argument("name")
    create.add_argument("--balance", type=_money, default=Money(0), help="initial balance in USD")
    create.add_argument("--max-concurrent-sessions", type=_positive, default=None)
    create.add_argument("--session-token-cap", type=_positive, default=None)
    accounts.add_parser("list")
    top = accounts.add_parser("topup")
    top.add_argument("account_id")
    top.add_argument("amount", type=_money, help="USD, e.g. 25.00")
    top.add_argument("--note", default="")
    for verb, what in (("deactivate", "refuse its keys and end its live sessions"), ("activate", "undo deactivate")):
        accounts.add_parser(verb, help=what).add_argument("account_id")

    keys = sub.add_parser("keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create")
    kc.add_argument("account_id")
    kc.add_argument("--name", default="")
    kc.add_argument("--token-cap", type=_positive, default=None)
    kl = keys.add_parser("list")
    kl.add_argument("--account", default=None)
    kr = keys.add_parser("revoke")
    kr.add_argument("key_id")

    usage = sub.add_parser("usage", help="session usage records")
    usage.add_argument("--account", default=None)
    usage.add_argument("--limit", type=_positive, default=20)

    sub.add_parser("models", help="realtime models and their rates")

    bench = sub.add_parser("bench", help="the benchmark harness")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--out", default=None)
    return parser


def open_database(settings):
    """An engine on the settings' database with the schema in place, and what creating it did."""
    from meshrt.storage import db

    if not settings.database_url:  # SQLite, in the state dir
        make_state_dir(settings)
    engine = db.make_engine(settings.db_url, settings.db_timeout_s)
    return engine, db.create_schema(engine)


def failure_line(exc: BaseException, settings) -> str | None:
    """The one line for a failure the person can fix, or None for a bug (its traceback is wanted)."""
    if isinstance(exc, CommandError):
        return str(exc)
    sa_exc = sys.modules.get("sqlalchemy.exc")  # loaded if the database was touched at all
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError) and settings is not None:
        from meshrt.storage.db import explain_failure

        return explain_failure(settings.db_url, exc)
    return None


def _key_state(key) -> str:
    """`keys list`'s last column; an ephemeral key names the rsk_ key that minted it."""
    state = "revoked" if key.revoked_at else "active"
    if key.parent_key_id is None:
        return state
    if not key.revoked_at and key.expires_at is not None and key.expires_at <= time.time():
        state = "expired"
    return f"{state}\tephemeral of {key.parent_key_id}, expires_at {key.expires_at}"


def _print(args, payload, text: str) -> None:
    print(json.dumps(payload, indent=2) if args.json else text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if command is not None and argv[command] == "sim":  # its flags are the simulator's own (docs/simulator.md)
        from meshrt import simulator

        return simulator.main(argv[command + 1 :])
    args = build_parser().parse_args(argv)
    try:
        overrides = {}
        if getattr(args, "port", None) is not None and args.command in ("serve", "dev"):
            overrides["port"] = args.port
        if getattr(args, "host", None) is not None and args.command == "serve":
            overrides["host"] = args.host
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(f"meshrt: bad setting: {exc}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args, settings)
    except LookupError as exc:
        print(f"meshrt: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    except SettingsError as exc:
        print(f"meshrt: bad setting: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader left (`meshrt keys list | head -n 1`): end as a tool killed by SIGPIPE does,
        # quietly; stdout goes to /dev/null so the interpreter's last flush cannot complain
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as exc:
        line = failure_line(exc, settings)
        if line is None:
            raise
        print(f"meshrt: {line}", file=sys.stderr)
        return 1


def _dispatch(args, settings) -> int:
    from meshrt.shared import logs

    if args.command == "serve" and args.keep:
        from .keeper import keep

        logs.configure("keeper", settings.log_level)
        argv = ["serve", *(["--host", args.host] if args.host else [])]
        return keep(argv + (["--port", str(args.port)] if args.port is not None else []))
    if args.command == "serve":
        from .supervisor import exit_process
        from .supervisor import serve

        logs.configure("supervisor", settings.log_level)
        exit_process(serve(settings))
    if args.command == "dev":
        from meshrt.dev.demo import run_dev

        from .supervisor import exit_process

        exit_process(run_dev(settings, args))
    if args.command == "bench":
        from meshrt.bench.run import run_bench

        return run_bench(settings, args)
    return _operate(args, settings)


def _operate(args, settings) -> int:
    from meshrt.storage import accounts as ops
    from meshrt.storage.db import display_url

    engine, changes = open_database(settings)
    if args.command == "db":
        print(f"schema {changes.summary()} at {display_url(settings.db_url)}")
        return 0
    if args.command == "accounts":
        if args.accounts_command == "create":
            account = ops.create_account(
                engine, args.name, args.balance, args.max_concurrent_sessions, args.session_token_cap
            )
            _print(
                args,
                ops.account_json(account),
                f"{account.id}\t{account.name}\tbalance {Money(account.balance_pico).display()}",
            )
        elif args.accounts_command == "list":
            rows = ops.list_accounts(engine)
            _print(
                args,
                [ops.account_json(a) for a in rows],
                "\n".join(f"{a.id}\t{a.name}\t{Money(a.balance_pico).display()}" for a in rows) or "(no accounts)",
            )
        elif args.accounts_command in ("deactivate", "activate"):
            account = ops.set_active(engine, args.account_id, args.accounts_command == "activate")
            _print(args, ops.account_json(account), f"{account.id}\t{'active' if account.active else 'deactivated'}")
        else:
            account = ops.topup(engine, args.account_id, args.amount, args.note)
            _print(args, ops.account_json(account), f"{account.id}\tbalance {Money(account.balance_pico).display()}")
        return 0
    if args.command == "keys":
        if args.keys_command == "create":
            created = ops.create_key(engine, args.account_id, args.name, args.token_cap)
            payload = {**ops.key_json(created.key), "key": created.plaintext}
            _print(args, payload, f"{created.key.id}\t{created.plaintext}\n(the key is shown once; store it now)")
        elif args.keys_command == "list":
            rows = ops.list_keys(engine, args.account)
            _print(
                args,
                [ops.key_json(k) for k in rows],
                "\n".join(f"{k.id}\t{k.account_id}\t{k.display}\t{_key_state(k)}" for k in rows) or "(no keys)",
            )
        else:
            key = ops.revoke_key(engine, args.key_id)
            _print(args, ops.key_json(key), f"{key.id}\trevoked")
        return 0
    if args.command == "usage":
        from meshrt.frontdoor.usage import list_usage_cli

        return list_usage_cli(engine, args)
    if args.command == "models":
        from meshrt.frontdoor.catalog import load_catalog

        catalog = load_catalog(settings)
        rows = catalog.models_json()
        _print(args, rows, "\n".join(f"{m['id']}\t{json.dumps(m['pricing'])}" for m in rows))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
