"""`kdsl db`: list, show, export, import and prune tuning records."""

from __future__ import annotations

import datetime as dt
import statistics
import sys

from dsl.errors import DatabaseError

DB_HELP = "database URL (any SQLAlchemy URL or a SQLite file path; default: $KDSL_DB or the user cache)"


def register(subparsers) -> None:
    parser = subparsers.add_parser("db", help="inspect and manage the tuning database",
                                   description="Inspect and manage the tuning database.")
    sub = parser.add_subparsers(dest="db_command", metavar="ACTION", parser_class=type(parser))
    parser.set_defaults(func=lambda args: _usage(parser))

    p = sub.add_parser("list", help="list tuning records in a table")
    p.add_argument("--device", help="only records of this device (name such as h100, or fingerprint)")
    p.add_argument("--template", help="only records of this kernel template (e.g. gemm)")
    p.add_argument("--source", choices=["measured", "predicted", "shipped"], help="only records of this source")
    p.add_argument("--limit", type=int, default=None, help="show at most this many records")
    _db_option(p)
    p.set_defaults(func=_list)

    p = sub.add_parser("show", help="show every field of one record")
    p.add_argument("id", type=int, help="record id (the ID column of `kdsl db list`)")
    _db_option(p)
    p.set_defaults(func=_show)

    p = sub.add_parser("export", help="write records as JSON lines")
    p.add_argument("file", help="output file ('-' for standard output)")
    p.add_argument("--device", help="only records of this device (name or fingerprint)")
    p.add_argument("--template", help="only records of this kernel template")
    _db_option(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("import", help="import a JSON-lines file: every line validated, all or nothing")
    p.add_argument("file", help="JSON-lines file written by `kdsl db export` (or a tuning_db/ file)")
    _db_option(p)
    p.set_defaults(func=_import)

    p = sub.add_parser("prune", help="delete records by Triton version, device, template or age")
    p.add_argument("--stale", action="store_true", help="records tuned with another Triton version than installed")
    p.add_argument("--device", help="records of this device (name or fingerprint)")
    p.add_argument("--template", help="records of this kernel template")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="records created more than DAYS days ago")
    p.add_argument("--yes", action="store_true", help="delete without asking")
    _db_option(p)
    p.set_defaults(func=_prune)


def _db_option(parser) -> None:
    parser.add_argument("--db", metavar="URL", default=None, help=DB_HELP)


def _usage(parser) -> int:
    parser.print_help()
    return 2


def _open(args):
    from autotune.db import TuningDB

    return TuningDB(args.db)


def _console():
    from rich.console import Console

    # Piped output (CI logs, grep) would otherwise be squeezed into 80 columns.
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def _compact(mapping: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in mapping.items())


def _list(args) -> int:
    from rich.table import Table

    with _open(args) as db:
        records = db.query(device=args.device, template=args.template, sources=args.source, limit=args.limit)
    console = _console()
    if not records:
        console.print("no records")
        return 0
    table = Table(title=f"{len(records)} tuning record(s)")
    for name, justify in (("ID", "right"), ("template", "left"), ("op", "left"), ("device", "left"),
                          ("shape", "left"), ("config", "left"), ("time ms", "right"), ("source", "left"),
                          ("triton", "left"), ("created", "left")):
        table.add_column(name, justify=justify)
    for r in records:
        table.add_row(str(r.id), r.template, r.op_name, r.device_name, r.shape_key, _compact(r.config),
                      f"{r.time_ms:.4g}", r.source, r.triton_version, r.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)
    return 0


def _show(args) -> int:
    from rich.table import Table

    with _open(args) as db:
        record = db.get(args.id)
    if record is None:
        raise DatabaseError(f"no record with id {args.id}")
    table = Table(title=f"record {record.id}", show_header=False)
    table.add_column("field")
    table.add_column("value")
    rows = [("template", record.template), ("op", record.op_name), ("kernel hash", record.source_hash),
            ("shape", record.shape_key), ("config", _compact(record.config)), ("time ms", f"{record.time_ms:.6g}")]
    if record.samples:
        s = record.samples
        rows.append(("samples", f"n={len(s)} median={statistics.median(s):.6g} min={min(s):.6g} max={max(s):.6g}"))
    rows += [("throughput", "-" if record.throughput is None else f"{record.throughput:.6g}"),
             ("source", record.source), ("triton", record.triton_version), ("kdsl", record.kdsl_version),
             ("created", record.created_at.isoformat())]
    rows += [(f"device.{k}", "-" if v is None else str(v)) for k, v in record.device.items()]
    for field, value in rows:
        table.add_row(field, value)
    _console().print(table)
    return 0


def _export(args) -> int:
    from autotune.records import export_records

    with _open(args) as db:
        count = export_records(db, args.file, device=args.device, template=args.template)
    if args.file != "-":
        print(f"exported {count} record(s) to {args.file}")
    return 0


def _import(args) -> int:
    from autotune.records import import_records

    with _open(args) as db:
        count = import_records(db, args.file)
    print(f"imported {count} record(s) from {args.file}")
    return 0


def _prune(args) -> int:
    if not (args.stale or args.device or args.template or args.older_than is not None):
        raise DatabaseError("prune needs at least one of --stale, --device, --template, --older-than")
    if args.older_than is not None and args.older_than < 0:
        raise DatabaseError(f"--older-than must be >= 0 days, got {args.older_than:g}")
    criteria = {"device": args.device, "template": args.template, "stale": args.stale,
                "older_than": None if args.older_than is None else dt.timedelta(days=args.older_than)}
    with _open(args) as db:
        count = db.prune(dry_run=True, **criteria)
        if count == 0:
            print("nothing to prune")
            return 0
        if not args.yes:
            if not sys.stdin.isatty():
                raise DatabaseError(f"would delete {count} record(s); pass --yes to confirm")
            answer = input(f"delete {count} record(s) from {db.shown_url}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        deleted = db.prune(**criteria)
    print(f"deleted {deleted} record(s)")
    return 0
