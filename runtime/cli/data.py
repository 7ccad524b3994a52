"""`kdsl data`: build and inspect the multi-domain training corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="build and inspect the multi-domain training corpus",
                                   description="Build and inspect the multi-domain training corpus.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")

    prep = sub.add_parser("prepare", help="collect code/docs/news/wiki text, train the BPE tokenizer, write shards",
                          description="Collect four domains available offline (Python stdlib source, the "
                          "python3.11-doc sources, news and Wikipedia samples from the gensim wheel), "
                          "split each into train/held-out, train a byte-level BPE tokenizer and write "
                          "uint16 token shards plus manifest.json.")
    prep.add_argument("--out", type=Path, default=None,
                      help="output directory (default: the kdsl user cache directory + /data)")
    prep.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary size (257..65535)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the document sampling and held-out split")
    prep.add_argument("--heldout", type=float, default=0.05, help="fraction of each domain's documents held out")
    prep.add_argument("--max-mb-per-domain", type=float, default=8.0,
                      help="cap on each domain's text in MiB (0 = no cap)")
    prep.add_argument("--doc-deb", type=Path, default=None,
                      help="an already downloaded python3.11-doc .deb (default: apt-get download it)")
    prep.add_argument("--gensim-wheel", type=Path, default=None,
                      help="an already downloaded gensim wheel (default: pip download it)")
    prep.add_argument("--lib-dir", type=Path, default=None,
                      help="Python standard library directory for the code domain (default: this interpreter's)")
    prep.add_argument("--force", action="store_true", help="rebuild even if a complete corpus is there")
    prep.set_defaults(func=_prepare)

    info = sub.add_parser("info", help="print the manifest of a prepared corpus",
                          description="Print per-domain token counts of a prepared corpus.")
    info.add_argument("--dir", type=Path, default=None, help="corpus directory (default: as for prepare)")
    info.add_argument("--json", action="store_true", help="print the raw manifest JSON")
    info.set_defaults(func=_info)
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])


def _print_table(manifest: dict, where: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"corpus at {where} (vocab {manifest['vocab_size']})")
    for col in ("domain", "train docs", "train tokens", "held-out docs", "held-out tokens", "text MiB"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for name, entry in sorted(manifest["domains"].items()):
        tr, ho = entry["splits"]["train"], entry["splits"]["heldout"]
        table.add_row(name, f"{tr['documents']:,}", f"{tr['tokens']:,}", f"{ho['documents']:,}",
                      f"{ho['tokens']:,}", f"{(tr['bytes'] + ho['bytes']) / 2**20:.2f}")
    Console().print(table)


def _prepare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from runtime.train import data

    out = args.out or data.default_data_dir()
    if (out / data.MANIFEST).is_file() and not args.force:
        manifest = data.load_manifest(out)
        print(f"corpus already prepared at {out} (use --force to rebuild)")
        _print_table(manifest, out)
        return 0
    console = Console(stderr=True)
    cap = int(args.max_mb_per_domain * 2**20) if args.max_mb_per_domain > 0 else None
    with console.status("preparing corpus") as status:
        def log(msg: str) -> None:
            console.log(msg)
            status.update(msg)

        manifest = data.prepare(out, vocab_size=args.vocab, seed=args.seed, heldout_fraction=args.heldout,
                                max_bytes_per_domain=cap, doc_deb=args.doc_deb,
                                gensim_wheel=args.gensim_wheel, lib_dir=args.lib_dir, log=log)
    _print_table(manifest, out)
    print(f"done in {manifest['seconds']:.1f}s")
    return 0


def _info(args: argparse.Namespace) -> int:
    from runtime.train import data

    where = args.dir or data.default_data_dir()
    manifest = data.load_manifest(where)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        _print_table(manifest, where)
    return 0
