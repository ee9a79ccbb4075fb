"""
dachectl: dache from the command line (also `python -m dache.ctl`), written on
dache.client only.

Exit codes scripts can rely on: 0 ok, 1 not found, 2 usage or bad input,
3 precondition failed (or a conflict such as incrementing a non-number),
4 server, network or access error. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn, TextIO

from tqdm import tqdm

from dache.client import (
    DEFAULT_URL,
    BadRequest,
    Client,
    Conflict,
    DacheError,
    Entry,
    NotFound,
    PreconditionFailed,
    TooLarge,
)

OK, NOT_FOUND, USAGE, PRECONDITION, FAILURE = 0, 1, 2, 3, 4
IMPORT_BATCH = 500  # ops per batch request while importing (the server takes up to 1000)


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line on stderr (exit 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"dachectl: {message} (see {self.prog} --help)\n")


def one_line(text: str) -> str:
    """An error message on one line, whatever the server or the network said."""
    return " ".join(str(text).split())


def check_url(url: str) -> str:
    if url.startswith(("http://", "https://")) or (url.startswith("unix:") and len(url) > 5):
        return url
    raise UsageError(f"--url {url!r}: expected http://..., https://... or unix:/path/to.sock")


def exit_code(error: DacheError) -> int:
    if isinstance(error, NotFound):
        return NOT_FOUND
    if isinstance(error, (PreconditionFailed, Conflict)):
        return PRECONDITION
    if isinstance(error, (BadRequest, TooLarge)):
        return USAGE
    return FAILURE


# -- output


class Output:
    def __init__(self, mode: str, out: TextIO):
        self.json = mode == "json"
        self.out = out

    def line(self, text: str) -> None:
        self.out.write(text + "\n")

    def document(self, doc: Any, text: str | None = None) -> None:
        """`doc` as one JSON line with --output json, else `text` (default: doc as JSON)."""
        if self.json or text is None:
            self.line(json.dumps(doc, ensure_ascii=False))
        else:
            self.line(text)


def entry_doc(entry: Entry) -> dict[str, Any]:
    doc: dict[str, Any] = {"key": entry.key, "value": entry.value}
    if entry.expiry is not None:
        doc["expiry"] = entry.expiry
    if entry.revision is not None:
        doc["revision"] = entry.revision
    return doc


def value_text(value: Any) -> str:
    """A value for humans: strings bare, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def progress(items: Iterable[Any], what: str, total: int | None = None) -> Iterable[Any]:
    """A progress bar on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return items
    return tqdm(items, desc=what, total=total, unit=" keys", file=sys.stderr)


def read_source(name: str) -> TextIO:
    if name == "-":
        return sys.stdin
    try:
        return open(name, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read {name}: {e.strerror}") from None


# -- commands


def cmd_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    entry = client.get(args.key)
    out.document(entry_doc(entry), value_text(entry.value))
    return OK


def cmd_set(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.string:
        value: Any = args.value
    else:
        try:
            value = json.loads(args.value)
        except ValueError:
            raise UsageError(
                f"VALUE is not JSON: {args.value!r} (quote it, or give --string)"
            ) from None
    extra: dict[str, Any] = {}
    if args.expiry is not None:
        extra["expiry"] = args.expiry
    revision = client.set(
        args.key, value, ttl=args.ttl, if_match=args.if_match, if_absent=args.if_absent, **extra
    )
    if out.json:
        out.document({"key": args.key, "revision": revision})
    return OK


def cmd_del(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.delete(args.key, if_match=args.if_match)
    return OK


def cmd_patch(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.ttl is None and args.expiry is None and args.increment is None and not args.persist:
        raise UsageError("patch needs --ttl, --expiry, --persist or --increment")
    extra: dict[str, Any] = {}
    if args.expiry is not None:
        extra["expiry"] = args.expiry
    if args.persist:
        extra["expiry"] = None
    entry = client.patch(
        args.key, ttl=args.ttl, increment=args.increment, if_match=args.if_match, **extra
    )
    if entry is not None:
        out.document(entry_doc(entry), value_text(entry.value))
    return OK


def cmd_ls(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.count:
        count = client.count(args.prefix)
        out.document({"count": count}, str(count))
        return OK
    for entry in client.scan(args.prefix, page=args.page, values=args.values):
        if args.values:
            out.document(entry_doc(entry), f"{entry.key}\t{value_text(entry.value)}")
        else:
            out.document({"key": entry.key, "revision": entry.revision}, entry.key)
    return OK


def cmd_rm(client: Client, args: argparse.Namespace, out: Output) -> int:
    if not args.prefix:
        raise UsageError("rm needs a non-empty --prefix")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("rm asks before deleting: give --yes when not on a terminal")
        count = client.count(args.prefix)
        sys.stderr.write(f"delete {count} keys under {args.prefix!r}? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            sys.stderr.write("nothing deleted\n")
            return OK
    deleted = client.delete_prefix(args.prefix)
    out.document({"deleted": deleted}, f"deleted {deleted}")
    return OK


def cmd_batch(client: Client, args: argparse.Namespace, out: Output) -> int:
    source = read_source(args.file)
    try:
        document = json.load(source)
    except ValueError as e:
        raise UsageError(f"{args.file}: not JSON: {e}") from None
    ops = document.get("ops") if isinstance(document, dict) else document
    if not isinstance(ops, list):
        raise UsageError(f'{args.file}: expected {{"ops": [...]}} or a list of ops')
    results = client.batch(ops)
    docs = [entry_doc(r) if isinstance(r, Entry) else r for r in results]
    out.document({"results": docs})
    return OK


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    for event in client.watch(args.prefix, since=args.since, give_up_after=args.give_up_after):
        if out.json:
            out.document({"event": event.kind, "revision": event.revision, "data": event.data})
        else:
            value = "" if event.kind != "set" else "\t" + value_text(event.value)
            out.line(f"{event.revision}\t{event.kind}\t{event.key or ''}{value}")
        out.out.flush()
        if event.kind == "error":
            raise DacheError(f"watch ended by the server: {event.data}")
    return OK


def cmd_health(client: Client, args: argparse.Namespace, out: Output) -> int:
    doc = client.health()
    checks = doc.get("checks", {}) if isinstance(doc, dict) else {}
    text = doc.get("status", "?") if isinstance(doc, dict) else str(doc)
    for name, values in checks.items():
        for check in values if isinstance(values, list) else [values]:
            if isinstance(check, dict):
                text += f"\n{name}: {check.get('status', '?')}"
                if check.get("observedValue") is not None:
                    text += f", {check['observedValue']} {check.get('observedUnit', '')}".rstrip()
                if check.get("output"):
                    text += f" ({check['output']})"
    out.document(doc, text)
    return OK if doc.get("status") in ("pass", "warn") else FAILURE


def import_ops(lines: Iterable[str], name: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            raise UsageError(f"{name}:{number}: not a JSON line") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("key"), str) or "value" not in doc:
            raise UsageError(f'{name}:{number}: expected {{"key": ..., "value": ...}}')
        op = {"op": "set", "key": doc["key"], "value": doc["value"]}
        if doc.get("expiry") is not None:
            op["expiry"] = doc["expiry"]
        yield op


def cmd_import(client: Client, args: argparse.Namespace, out: Output) -> int:
    ops = import_ops(read_source(args.file), args.file)
    imported, chunk = 0, []
    for op in progress(ops, "import"):
        chunk.append(op)
        if len(chunk) >= args.batch_size:
            imported += len(client.batch(chunk))
            chunk = []
    if chunk:
        imported += len(client.batch(chunk))
    out.document({"imported": imported}, f"imported {imported} keys")
    return OK


def cmd_export(client: Client, args: argparse.Namespace, out: Output) -> int:
    total = client.count(args.prefix) if sys.stderr.isatty() else None
    for entry in progress(client.scan(args.prefix), "export", total):
        doc = {"key": entry.key, "value": entry.value}
        if entry.expiry is not None:
            doc["expiry"] = entry.expiry
        out.line(json.dumps(doc, ensure_ascii=False))
    return OK


# -- the parser


def global_options(defaults: bool) -> argparse.ArgumentParser:
    """
    The options every command takes, before or after its name. Only the
    top-level parser holds defaults, so an option given after the command is
    not overwritten by the command's own (suppressed) default.
    """
    g = Parser(add_help=False)

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    g.add_argument(
        "--url",
        default=default(os.environ.get("DACHE_URL", DEFAULT_URL)),
        help=f"dache's URL, or unix:/path/to.sock (env DACHE_URL; default {DEFAULT_URL})",
    )
    g.add_argument(
        "--token",
        default=default(None),
        help="bearer token (env DACHE_TOKEN, or a file named by DACHE_TOKEN_FILE)",
    )
    g.add_argument(
        "--token-file", default=default(None), help="file holding the token (env DACHE_TOKEN_FILE)"
    )
    g.add_argument(
        "--ca",
        default=default(os.environ.get("DACHE_CA")),
        help="CA bundle (PEM) to verify an https URL with (env DACHE_CA)",
    )
    g.add_argument(
        "--timeout", type=float, default=default(10.0), help="seconds per request (default 10)"
    )
    g.add_argument(
        "--output",
        "-o",
        choices=("text", "json"),
        default=default(os.environ.get("DACHE_OUTPUT", "text")),
        help="text for people, json (one document per line) for scripts (env DACHE_OUTPUT)",
    )
    return g


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="dachectl",
        parents=[global_options(defaults=True)],
        description="dache from the command line. Exit codes: 0 ok, 1 not found, "
        "2 usage or bad input, 3 precondition failed or conflict, "
        "4 server, network or access error.",
    )
    common = global_options(defaults=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help, parents=[common])
        c.set_defaults(func=func)
        return c

    c = command("get", cmd_get, "print a key's value (text) or entry (json)")
    c.add_argument("key")

    c = command("set", cmd_set, "store VALUE (parsed as JSON unless --string) under KEY")
    c.add_argument("key")
    c.add_argument("value")
    c.add_argument("--string", action="store_true", help="store VALUE as a JSON string")
    when = c.add_mutually_exclusive_group()
    when.add_argument("--ttl", type=float, help="seconds from now until it expires")
    when.add_argument("--expiry", type=float, help="unix seconds (UTC) when it expires")
    cond = c.add_mutually_exclusive_group()
    cond.add_argument(
        "--if-match", metavar="REVISION", help="only if the key is at REVISION (or *)"
    )
    cond.add_argument("--if-absent", action="store_true", help="only if the key does not exist")

    c = command("del", cmd_del, "delete a key (ok when absent)")
    c.add_argument("key")
    c.add_argument("--if-match", metavar="REVISION", help="only if the key is at REVISION (or *)")

    c = command("patch", cmd_patch, "change a key's expiry and/or add to its number")
    c.add_argument("key")
    when = c.add_mutually_exclusive_group()
    when.add_argument("--ttl", type=float, help="expire this many seconds from now")
    when.add_argument("--expiry", type=float, help="expire at unix seconds (UTC)")
    when.add_argument("--persist", action="store_true", help="never expire")
    c.add_argument("--increment", type=json.loads, metavar="N", help="add N (absent key: 0)")
    c.add_argument("--if-match", metavar="REVISION", help="only if the key is at REVISION (or *)")

    c = command("ls", cmd_ls, "list keys under a prefix, in order (pages through them all)")
    c.add_argument("prefix", nargs="?", default="")
    c.add_argument("--values", action="store_true", help="print values too")
    c.add_argument("--count", action="store_true", help="print only how many keys")
    c.add_argument("--page", type=int, default=1000, help=argparse.SUPPRESS)

    c = command("rm", cmd_rm, "delete every key under a prefix (asks first unless --yes)")
    c.add_argument("--prefix", required=True)
    c.add_argument("--yes", "-y", action="store_true", help="do not ask")

    c = command("batch", cmd_batch, 'apply a JSON {"ops": [...]} document atomically')
    c.add_argument("file", metavar="FILE|-")

    c = command("watch", cmd_watch, "print one line per change under a prefix, as they happen")
    c.add_argument("prefix", nargs="?", default="")
    c.add_argument("--since", type=int, metavar="REV", help="replay changes after revision REV")
    c.add_argument(
        "--give-up-after",
        type=float,
        default=60.0,
        metavar="S",
        help="exit 4 after S seconds without a connection (default %(default)s)",
    )

    command("health", cmd_health, "the node's health (exit 4 unless pass or warn)")

    c = command("import", cmd_import, "load JSON lines {key, value, expiry?} in batches")
    c.add_argument("file", metavar="FILE|-")
    c.add_argument("--batch-size", type=int, default=IMPORT_BATCH, help=argparse.SUPPRESS)

    c = command("export", cmd_export, "print every entry under a prefix as JSON lines")
    c.add_argument("prefix", nargs="?", default="")
    return p


def token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token)
    path = args.token_file or os.environ.get("DACHE_TOKEN_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as e:
            raise UsageError(f"cannot read the token file {path}: {e.strerror}") from None
    return os.environ.get("DACHE_TOKEN") or None


def connect(args: argparse.Namespace) -> Client:
    url = check_url(args.url)
    try:
        return Client(url, token=token(args), ca=args.ca, timeout=args.timeout)
    except (OSError, ssl.SSLError) as e:  # only the CA bundle is read here
        raise UsageError(f"--ca {args.ca}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # exits 2 with argparse's usage line
    out = Output(args.output, sys.stdout)
    try:
        with connect(args) as client:
            return int(args.func(client, args, out))
    except UsageError as e:
        sys.stderr.write(f"dachectl: {one_line(str(e))}\n")
        return USAGE
    except DacheError as e:
        sys.stderr.write(f"dachectl: {one_line(e.message)}\n")
        return exit_code(e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return OK  # `dachectl export | head`


if __name__ == "__main__":
    sys.exit(main())
