#!/usr/bin/env python3
"""Prints the overlay benchmark results as a Markdown table with ratios against each group's peer.

Usage: python3 crates/rootfork-block/benches/table.py [CRITERION_DIR]
(default: $CARGO_TARGET_DIR/criterion or target/criterion). Run after
`cargo bench -p rootfork-block --bench overlay`.
"""
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.environ.get("CARGO_TARGET_DIR", "target"), "criterion")

# group -> list of (bench id, peer id)
PEERS = {
    "create": None,  # peers are per file system and size, see below
    "read_4k_random_unwritten": "pread_template",
    "read_4k_random_written": "pread_template",
    "write_4k_random": "pwrite_file",
    "read_1m_sequential": "pread_template",
}


def estimates(path):
    with open(os.path.join(path, "new", "estimates.json")) as f:
        e = json.load(f)
    return e["median"]["point_estimate"], e["median"]["confidence_interval"]


def benches(group):
    out = []
    gdir = os.path.join(root, group)
    for dirpath, dirnames, filenames in os.walk(gdir):
        if os.path.basename(dirpath) == "new" and "estimates.json" in filenames:
            bench_dir = os.path.dirname(dirpath)
            out.append(os.path.relpath(bench_dir, gdir))
    return sorted(out)


def fmt(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


print("| group | benchmark | median | ratio vs peer | peer |")
print("|---|---|---|---|---|")
for group, peer in PEERS.items():
    if not os.path.isdir(os.path.join(root, group)):
        continue
    ids = benches(group)
    for b in ids:
        med, _ = estimates(os.path.join(root, group, b))
        if group == "create":
            fs, kind, size = b.split("/")
            p = f"{fs}/file_create_set_len/{size}"
        else:
            p = peer
        pmed, _ = estimates(os.path.join(root, group, p))
        ratio = "—" if p == b else f"{med / pmed:.3f}"
        print(f"| {group} | {b} | {fmt(med)} ({med:.0f} ns) | {ratio} | {p if p != b else ''} |")
