#!/usr/bin/env python3
"""scripts/layers.py — the workspace's import graph, checked: no cycle between crates, between
the top-level modules (folders and files under src/) of one crate, or between the files of one
folder, and no arrow from a lower layer of the trainer to a higher one (the layers are listed
below, lowest first).

An arrow A -> B means a file of module A names `crate::B`, `crate::{B, ...}`, or `super::B`
(from a file directly in src/ or from A's mod.rs). Tests (`tests/`, `#[cfg(test)] mod tests` blocks) are left out: they may
reach anywhere. Crate arrows come from each member's Cargo.toml [dependencies].

Usage: scripts/layers.py [--graph]   (--graph prints every arrow; exit 1 on a cycle or a
back-arrow, naming the files that make it)
"""
import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# The trainer's modules, lowest layer first; a module may use those of its own layer or below.
TRAINER_LAYERS = [
    ["error", "faults", "signals", "logging", "autocast", "device", "tensorboard", "cxx", "tensors"],
    ["dist"],
    ["config"],
    ["metrics", "budget", "optim"],
    ["checkpoint"],
    ["interop"],
    ["inference", "datasource"],
    ["train", "report"],
    ["cli"],
]


def strip_tests(text):
    """The source without `#[cfg(test)]` items (a brace-matched block after the attribute)."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        j = text.find("{", m.end())
        semi = text.find(";", m.end())
        if j < 0 or (0 <= semi < j):
            i = semi + 1
            continue
        depth = 0
        for k in range(j, len(text)):
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            if depth == 0:
                i = k + 1
                break
        else:
            i = len(text)
    out.append(text[i:])
    return "".join(out)


def names_used(text, is_mod_root):
    """Top-level module names a file refers to through `crate::` (and `super::` from a mod.rs)."""
    text = re.sub(r"//[^\n]*", "", text)  # comments (doc links name modules without using them)
    names = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", text))
    for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
        names.update(re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", group))
    if is_mod_root:
        names.update(re.findall(r"\bsuper::([a-z_][a-z0-9_]*)", text))
        for group in re.findall(r"\bsuper::\{([^}]*)\}", text):
            names.update(re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", group))
    return names


def module_graph(src):
    """{module: {module it uses: [files]}} for the top-level modules of one crate's src/."""
    modules = {
        os.path.splitext(e)[0]
        for e in os.listdir(src)
        if (e.endswith(".rs") and e not in ("lib.rs", "main.rs")) or os.path.isdir(os.path.join(src, e))
    }
    graph = {m: {} for m in modules}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, src)
            top = rel.split(os.sep)[0]
            module = os.path.splitext(top)[0]
            if module not in graph:
                continue  # lib.rs / main.rs: the crate root wires modules, it is no layer
            # `super::` names a top-level module from a file directly in src/ or a folder's mod.rs.
            nested_root = rel.count(os.sep) == 0 or (rel.count(os.sep) == 1 and f == "mod.rs")
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = strip_tests(fh.read())
            for name in names_used(text, nested_root):
                if name in graph and name != module:
                    graph[module].setdefault(name, []).append(os.path.relpath(path, ROOT))
    return graph


def cycles(graph):
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def folder_graphs(src, crate):
    """{"<crate>/src/<folder>": {file: {sibling file it uses: [files]}}} for every folder below
    src/: `super::name` from a file that is not the folder's mod.rs (the folder's own
    declarations are its structure, not a dependency)."""
    out = {}
    for dirpath, _, files in os.walk(src):
        if os.path.samefile(dirpath, src):
            continue
        stems = {os.path.splitext(f)[0] for f in files if f.endswith(".rs") and f != "mod.rs"}
        graph = {stem: {} for stem in stems}
        for f in files:
            stem = os.path.splitext(f)[0]
            if stem not in graph:
                continue
            path = os.path.join(dirpath, f)
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = re.sub(r"//[^\n]*", "", strip_tests(fh.read()))
            used = set(re.findall(r"\bsuper::([a-z_][a-z0-9_]*)", text))
            for group in re.findall(r"\bsuper::\{([^}]*)\}", text):
                used.update(re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", group))
            for name in used & stems - {stem}:
                graph[stem].setdefault(name, []).append(os.path.relpath(path, ROOT))
        out[f"{crate}/src/{os.path.relpath(dirpath, src)}"] = graph
    return out


def crate_graph():
    members = {}
    for d in sorted(os.listdir(ROOT)):
        toml = os.path.join(ROOT, d, "Cargo.toml")
        if d != "target" and os.path.isfile(toml):
            with open(toml, encoding="utf-8") as fh:
                text = fh.read()
            name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M).group(1)
            deps = re.search(r"^\[dependencies\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
            members[name] = (d, set(re.findall(r"^(mla-[a-z-]+)", deps.group(1) if deps else "", re.M)))
    return {name: {dep: [f"{d}/Cargo.toml"] for dep in deps} for name, (d, deps) in members.items()}


def main():
    show = "--graph" in sys.argv[1:]
    problems = []
    graphs = {"crates": crate_graph()}
    for d in sorted(os.listdir(ROOT)):
        src = os.path.join(ROOT, d, "src")
        if d != "target" and os.path.isdir(src) and os.path.isfile(os.path.join(ROOT, d, "Cargo.toml")):
            graphs[f"{d}/src"] = module_graph(src)
            graphs.update(folder_graphs(src, d))
    for where, graph in graphs.items():
        arrows = sum(len(v) for v in graph.values())
        if show:
            for a in sorted(graph):
                for b in sorted(graph[a]):
                    print(f"{where}: {a} -> {b}  ({', '.join(sorted(set(graph[a][b]))[:3])})")
        for comp in cycles(graph):
            ties = [f"{a} -> {b} ({sorted(set(graph[a][b]))[0]})" for a in comp for b in graph[a] if b in comp]
            problems.append(f"{where}: cycle {' ↔ '.join(comp)}: " + "; ".join(ties))
        if where.count("/") < 2:  # crates and crates' src/: one line each; folders only when wrong
            print(f"layers.py: {where}: {len(graph)} modules, {arrows} arrows", file=sys.stderr)
    layer = {m: i for i, ms in enumerate(TRAINER_LAYERS) for m in ms}
    trainer = graphs.get("trainer/src", {})
    unplaced = sorted(set(trainer) - set(layer))
    if unplaced:
        problems.append(f"trainer/src: modules in no layer of scripts/layers.py: {', '.join(unplaced)}")
    for a, uses in sorted(trainer.items()):
        for b, files in sorted(uses.items()):
            if a in layer and b in layer and layer[b] > layer[a]:
                problems.append(f"trainer/src: {a} (layer {layer[a]}) -> {b} (layer {layer[b]}), higher: {sorted(set(files))[0]}")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"layers.py: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print("layers.py: no cycle between crates, modules or the files of a folder; no arrow up a layer", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
