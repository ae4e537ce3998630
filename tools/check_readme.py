"""Run every example of README.md as written, and check the main command's printed output.

    python3 tools/check_readme.py                # run every runnable example, report each
    python3 tools/check_readme.py --print-setup  # the set-up commands, for `eval` in .ci/run

Each ```bash block is run line by line (a trailing backslash continues a line) with
bash, and each ```python block as one script, from the repository root, in a fresh
HOME (so nothing cached from earlier runs helps); what the examples write there is
removed afterwards. A block whose first line is a comment `# needs: ...` states what it needs
beyond this CPU machine (GPUs, GLM-130B's checkpoint, an hour): it is reported as
skipped with that reason. The block under "Run the main job" must print exactly the
output the README shows after it. Standard library only: it runs before anything is
installed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SETUP_HEADING = "## Set-up"
MAIN_MARKER = "Run the main job"  # the main command's block follows this line
OUTPUT_MARKER = "The main command prints"  # and what it prints is the plain block after this line
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TIMEOUT = 3600  # seconds for one command (the test suite is the longest)


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    heading: str  # the section it is in
    commands: list[str]
    needs: str | None  # why it is not run here, as the README states it
    expected_output: str | None = None  # for the main command: what the README says it prints


def blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    found, heading, i = [], "", 0
    while i < len(lines):
        if lines[i].startswith("#") and not lines[i].startswith("#!"):
            heading = lines[i].lstrip("#").strip()
        if lines[i].strip() in ("```bash", "```python"):
            language, start, body = lines[i].strip()[3:], i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            needs = None
            if body and body[0].startswith("# needs:"):
                needs = body[0].removeprefix("# needs:").strip()
            # A Python block runs as one script.
            commands = _commands(body) if language == "bash" else ["python - <<'EOF'\n" + "\n".join(body) + "\nEOF"]
            found.append(Block(start, heading, commands, needs))
        i += 1
    return found


def _commands(body: list[str]) -> list[str]:
    commands, current = [], ""
    for line in body:
        if not current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            commands.append(current.strip())
        current = ""
    return commands


def main_command_output(text: str) -> str:
    """What the README says the main command prints: the block after OUTPUT_MARKER."""
    return text.split(OUTPUT_MARKER, 1)[1].split("```\n", 1)[1].split("```", 1)[0]


def run(block: Block, home: Path) -> tuple[bool, str]:
    env = dict(os.environ, HOME=str(home), NO_COLOR="1")
    env.pop("GLMC_CACHE_DIR", None)
    output = []
    for command in block.commands:
        print(f"$ {command}", flush=True)
        started = time.monotonic()
        capture = block.expected_output is not None
        result = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, timeout=TIMEOUT, text=True,
                                stdout=subprocess.PIPE if capture else None)
        if capture:
            output.append(result.stdout)
            sys.stdout.write(result.stdout)
        print(f"  (exit {result.returncode}, {time.monotonic() - started:.0f} s)", flush=True)
        if result.returncode != 0:
            return False, f"`{command}` exited with status {result.returncode}"
    if block.expected_output is not None:
        printed = _normalized(ANSI.sub("", "".join(output)))
        if printed != _normalized(block.expected_output):
            return False, "printed output differs from the README's:\n" + printed
    return True, "ran"


def _normalized(text: str) -> str:
    """Lines without trailing blanks (which editors strip), no blank lines at either end."""
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).strip("\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print-setup", action="store_true", help="print the set-up commands and exit")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    found = blocks(text)
    if args.print_setup:
        (setup,) = [b for b in found if b.heading.startswith(SETUP_HEADING.lstrip("# "))]
        print("\n".join(setup.commands))
        return 0
    marker_line = text[:text.index(MAIN_MARKER)].count("\n") + 1
    main_block = next(b for b in found if b.line > marker_line)
    main_block.expected_output = main_command_output(text)
    results = []
    before = set(os.listdir(REPO))
    with tempfile.TemporaryDirectory(prefix="glmc-readme-") as home:
        for block in found:
            if block.heading.startswith(SETUP_HEADING.lstrip("# ")):
                results.append((block, None, "the set-up (.ci/run does it, as written)"))
                continue
            if block.needs:
                results.append((block, None, f"needs {block.needs}"))
                continue
            print(f"\n== README.md:{block.line} ({block.heading})", flush=True)
            ok, why = run(block, Path(home))
            results.append((block, ok, why))
    for name in sorted(set(os.listdir(REPO)) - before):  # what the examples wrote (pkg/, samples/, ...)
        path = REPO / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    print("\nREADME examples:")
    for block, ok, why in results:
        status = "skipped" if ok is None else "ok" if ok else "FAILED"
        print(f"  {status:8} README.md:{block.line:<4} {block.heading[:40]:40} {why.splitlines()[0]}")
    failed = [why for _, ok, why in results if ok is False]
    for why in failed:
        print("\n" + why)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
