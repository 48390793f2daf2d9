"""Publish a folder of files (a model export) into a folder that holds other things too (checkpoints, metrics).

Hand-written because no library swaps a set of files into a shared folder: the new export is written completely
into a temp folder beside the target first (a full disk or a crash fails there, touching nothing), and only then
renamed in, entry by entry. Renames within one filesystem need no space and cannot fail half-way through a file,
so the folder holds the old export or the new one, never a mix of old and new files; the old export's entries the
new one lacks are removed last. `.export-manifest.json` lists what the last export wrote.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

MANIFEST = ".export-manifest.json"
TMP_PREFIX = ".export-tmp-"


def staging_folder(out_dir: str) -> str:
    """A fresh temp folder inside `out_dir` for this process; temp folders of killed runs are removed."""
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, TMP_PREFIX + "*")) + glob.glob(os.path.join(out_dir, ".export-old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = os.path.join(out_dir, f"{TMP_PREFIX}{os.getpid()}")
    os.makedirs(tmp)
    return tmp


def publish_folder(tmp: str, out_dir: str) -> list[str]:
    """Move every entry of `tmp` into `out_dir` (replacing same-named ones), drop the previous export's other
    entries, write the manifest; returns the new entries."""
    new = sorted(os.listdir(tmp))
    old_path = os.path.join(out_dir, MANIFEST)
    try:
        with open(old_path, encoding="utf-8") as f:
            old = json.load(f)["entries"]
    except (OSError, ValueError, KeyError):
        old = []
    trash = os.path.join(out_dir, f".export-old-{os.getpid()}")
    os.makedirs(trash, exist_ok=True)
    for name in new:
        dest = os.path.join(out_dir, name)
        if os.path.isdir(dest) and not os.path.islink(dest):
            os.replace(dest, os.path.join(trash, name))  # a folder cannot be renamed over a non-empty folder
        os.replace(os.path.join(tmp, name), dest)
    for name in old:
        if name not in new and os.path.lexists(os.path.join(out_dir, name)):
            os.replace(os.path.join(out_dir, name), os.path.join(trash, name))
    from embedder.data.jsonl import atomic_open

    with atomic_open(old_path, suffix=".json") as f:
        json.dump({"entries": new}, f, indent=1)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return new
