"""The command line: `python -m embedder.data.download NAME ... --to DIR`."""


from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from embedder.data.download.fetch import describe, download, list_text
from embedder.data.download.hub import Run
from embedder.data.download.sources import DEFAULT_TO, RESUME_HINT, DownloadError, resolve_sources
from embedder.errors import ReportedInputErrors

log = logging.getLogger(__name__)


def _disk_error(exc: OSError, root: Path) -> DownloadError | None:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DownloadError(f"no space left on the device while writing under {root} ({exc.filename or exc})",
                             hint="free some space or pass --to a folder on a bigger disk; " + RESUME_HINT)
    if isinstance(exc, PermissionError):
        return DownloadError(f"permission denied: {exc.filename or exc}",
                             hint="pass --to a folder you can write to")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m embedder.data.download",
        description="Download the LLM-Embedder data, the QReCC corpus or BEIR datasets from the Hugging Face Hub.",
        epilog="Rerunning the same command resumes; a complete download is skipped.")
    parser.add_argument("names", nargs="*", metavar="NAME", help="llm-embedder, qrecc-corpus, beir:<name> (--list)")
    parser.add_argument("--to", default=os.environ.get("EMBEDDER_DATA") or DEFAULT_TO, metavar="DIR",
                        help="data root (default: $EMBEDDER_DATA, else ./data/llm-embedder); pass it as data_root=DIR")
    parser.add_argument("--list", action="store_true", help="list the dataset names and exit")
    parser.add_argument("--dry-run", action="store_true", help="print what would be downloaded and where; no network")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of the Hub repos (default: main)")
    parser.add_argument("--keep-archive", action=argparse.BooleanOptionalAction, default=False,
                        help="keep llm-embedder.tar.gz and the BEIR .gz files after unpacking (default: delete them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)  # quiet httpx's request lines
    log.setLevel(logging.INFO)
    if args.list:
        print(list_text())
        return 0
    if not args.names:
        parser.error("give at least one NAME (see --list)")
    root = Path(args.to).expanduser().absolute()
    with ReportedInputErrors():
        sources = resolve_sources(args.names)
        if args.dry_run:
            for source in sources:
                print("\n".join(describe(source, root)))
            print(f"dry run: nothing downloaded; then use data_root={root}")
            return 0
        try:
            download(sources, Run(root=root, revision=args.revision, keep_archive=args.keep_archive))
        except OSError as e:
            error = _disk_error(e, root)
            if error is None:
                raise
            raise error from None
        except KeyboardInterrupt:
            print(f"interrupted: {RESUME_HINT}", file=sys.stderr)
            raise SystemExit(130) from None
    print(f"done: {', '.join(s.name for s in sources)} in {root}; use data_root={root}")
    return 0

