#!/usr/bin/env python3
"""scripts/fn_length.py — no function in any crate's src/ longer than 150 lines (issue 24).

Counts each `fn` from its signature line to the line of its closing brace (braces inside
string and char literals and comments are skipped; raw strings are rare enough here to be
read as text). Prints the five longest; exit 1 naming every function over the limit.

Usage: scripts/fn_length.py [--limit N]
"""
import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FN = re.compile(r'\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"C"\s+)?fn\s+(\w+)')


def code(line):
    """The line without its string/char literals and its `//` comment."""
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    return line.split("//")[0]


def functions(path):
    lines = open(path, encoding="utf-8", errors="replace").read().split("\n")
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m:
            continue
        depth, started = 0, False
        for j in range(i, len(lines)):
            text = code(lines[j])
            if not started and text.rstrip().endswith(";"):
                break  # a declaration without a body (trait method, extern)
            for ch in text:
                if ch == "{":
                    depth, started = depth + 1, True
                elif ch == "}":
                    depth -= 1
            if started and depth == 0:
                yield j - i + 1, os.path.relpath(path, ROOT), i + 1, m.group(7)
                break


def main():
    limit = 150
    if "--limit" in sys.argv:
        limit = int(sys.argv[sys.argv.index("--limit") + 1])
    found = []
    for crate in sorted(os.listdir(ROOT)):
        src = os.path.join(ROOT, crate, "src")
        if crate == "target" or not os.path.isfile(os.path.join(ROOT, crate, "Cargo.toml")):
            continue
        for d in (src, os.path.join(ROOT, crate, "targets")):
            for dirpath, _, files in os.walk(d):
                for f in files:
                    if f.endswith(".rs"):
                        found.extend(functions(os.path.join(dirpath, f)))
    found.sort(reverse=True)
    for n, path, line, name in found[:5]:
        print(f"fn_length.py: {n:4} lines  {path}:{line} {name}", file=sys.stderr)
    over = [f for f in found if f[0] > limit]
    for n, path, line, name in over:
        print(f"fn_length.py: {path}:{line} {name} is {n} lines, over {limit}", file=sys.stderr)
    if over:
        return 1
    print(f"fn_length.py: {len(found)} functions, none over {limit} lines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
