"""Every command in README.md and docs/*.md is accepted as written: run through a real shell (which strips quotes the
way a user's does) with Hydra's `--cfg job`, so the override grammar, every key, every group option and every
interpolation are checked against the configs. Paths under /data and Hub models need not exist for this; the
offline defaults (`python train.py`, `python score.py`, `python mine.py`, `python -m embedder.evaluate`) are run for
real by test_pipeline, test_scoring, test_mining and test_evaluate. Multirun commands are checked job by job: the
first value of each sweep, without `-m`.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ENTRY = re.compile(r"^python3? (train\.py|mine\.py|score\.py|-m embedder\.evaluate)\b")


def documented_commands() -> list[tuple[str, str]]:
    """(file:line, command) of every entry-point command in a ```bash block, continuation lines joined."""
    out = []
    for path in [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        in_block, cmd, start = False, "", 0
        for i, line in enumerate(lines, start=1):
            if line.strip().startswith("```"):
                in_block, cmd = not in_block and line.strip() in ("```", "```bash", "```sh", "```shell"), ""
                continue
            if not in_block:
                continue
            text = line.strip()
            if not cmd:
                if not ENTRY.match(text):
                    continue
                start = i
            cmd = f"{cmd} {text}".strip()
            if cmd.endswith("\\"):
                cmd = cmd[:-1].rstrip()
                continue
            cmd = re.sub(r"\s+#.*$", "", cmd)
            if "..." not in cmd:  # `python score.py ... dry_run=true` is a pattern, not a command
                out.append((f"{os.path.relpath(path, ROOT)}:{start}", cmd))
            cmd = ""
    return out


def _single_job(cmd: str) -> str:
    """A multirun command as its first job: no -m, the first value of every comma sweep."""
    head = "python -m embedder.evaluate" if cmd.startswith("python -m embedder.evaluate") else cmd.split()[0] + " " + \
        cmd.split()[1]
    rest = cmd[len(head):].split()
    if "-m" not in rest:
        return cmd
    parts = [head]
    for tok in rest:
        if tok == "-m":
            continue
        if "=" in tok and "," in tok.split("=", 1)[1] and not tok.split("=", 1)[1].startswith(("[", "'", '"')):
            key, value = tok.split("=", 1)
            tok = f"{key}={value.split(',')[0]}"
        parts.append(tok)
    return " ".join(parts)


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) >= 25, COMMANDS


@pytest.mark.slow
@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_is_accepted(where, cmd):
    shell = _single_job(cmd).replace("python ", f"{sys.executable} ", 1).replace("python3 ", f"{sys.executable} ", 1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(["bash", "-c", f"{shell} --cfg job"], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, f"{where}: `{cmd}` is rejected:\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip(), f"{where}: `{cmd}` printed no config"
