"""`python -m busgen_lib reader-study create|serve|export`: run a visual Turing test or BI-RADS reader study.

    reader-study create --out DIR --real M [--real M2] --generated G --reader NAME [--reader NAME2 ...]
                        [--question turing|birads] [--n-per-source N] [--model-column COL] [--size PX] [--seed S]
    reader-study serve  --study DIR [--host 127.0.0.1] [--port 8765]
    reader-study export --study DIR --out answers.csv

`create` prints the organiser's link and one private link per reader (paths:
prefix them with the address `serve` prints); `export` writes the same CSV as
the organiser page's export.
"""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from busgen_lib.errors import UsageError
from busgen_lib.reader_study.questions import QUESTIONS, TURING

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def _create(args: argparse.Namespace) -> int:
    from busgen_lib.reader_study.create import create_study, organiser_path, reader_path

    study = create_study(args.out, args.reader, real=args.real or [], generated=args.generated or [],
                         question=args.question, n_per_source=args.n_per_source, model_column=args.model_column,
                         size=args.size, seed=args.seed, title=args.title)
    print(f"{study.folder}: {study.n_images} images, {len(study.reader_tokens)} reader(s); "
          f"serve it with `python -m busgen_lib reader-study serve --study {study.folder}`")
    print(f"organiser (keep private): {organiser_path(study.organiser_token)}")
    for reader, token in study.reader_tokens.items():
        print(f"reader {reader}: {reader_path(token)}")
    return 0


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, got {value}")
    return value


def _serve(args: argparse.Namespace) -> int:
    from busgen_lib.reader_study.app import create_app
    from busgen_lib.reader_study.create import organiser_path
    from busgen_lib.reader_study.store import Study

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        raise UsageError(f"--host {args.host!r}: give an IP address, e.g. 127.0.0.1 (this machine only)") from None
    app = create_app(args.study)
    study = Study(args.study)
    token = study.settings["organiser_token"]
    study.close()
    if not loopback:
        print(f"warning: serving on {args.host}, reachable from other machines without encryption; "
              "put it behind an HTTPS reverse proxy for a study over a network")
    print(f"organiser page: http://{args.host}:{args.port}{organiser_path(token)}", flush=True)
    app.run(host=args.host, port=args.port, threaded=True, debug=False, use_reloader=False)
    return 0


def _export(args: argparse.Namespace) -> int:
    from busgen_lib.reader_study.store import Study

    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"{out}: --out must be a CSV file name, but this is a folder")
    study = Study(args.study)
    study.write_export(out)
    print(f"{out}: {len(study.export_rows())} answers")
    study.close()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `reader-study create|serve|export` on a top-level parser's subparsers."""
    parser = subparsers.add_parser("reader-study", help="visual Turing test / BI-RADS reader study in the browser")
    sub = parser.add_subparsers(dest="reader_study_command", required=True,
                                help="create: a study folder; serve: its web pages; export: its answers (CSV)")

    p = sub.add_parser("create", help="a blinded, balanced study folder with one private link per reader")
    p.add_argument("--out", required=True, help="new (or empty) study folder")
    p.add_argument("--real", action="append", help="manifest of real images (repeat to pool several)")
    p.add_argument("--generated", action="append", help="manifest of generated images (repeat to pool several)")
    p.add_argument("--reader", action="append", required=True, help="a reader's name (repeat for each reader)")
    p.add_argument("--question", choices=QUESTIONS, default=TURING,
                   help="turing: real or generated with confidence 1-5; birads: 2, 3, 4a, 4b, 4c, 5")
    p.add_argument("--n-per-source", type=int,
                   help="images of each source (default: all of the smaller source, so real and generated balance)")
    p.add_argument("--model-column", help="birads: manifest column with the model's output, shown after the "
                                          "first answer and followed by a second answer")
    p.add_argument("--size", type=int, help="resample every image to SIZE x SIZE px (needed when real and "
                                            "generated images differ in size)")
    p.add_argument("--seed", type=int, default=0, help="image selection and each reader's order follow it")
    p.add_argument("--title", default="Reader study", help="title on the pages")
    p.set_defaults(func=_create)

    p = sub.add_parser("serve", help="serve a study folder's pages (this machine only by default)")
    p.add_argument("--study", required=True, help="study folder written by `reader-study create`")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (loopback: this machine only)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="port to listen on")
    p.set_defaults(func=_serve)

    p = sub.add_parser("export", help="write every answer with its truth as CSV (README: Reader studies)")
    p.add_argument("--study", required=True, help="study folder")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.set_defaults(func=_export)
    return parser
