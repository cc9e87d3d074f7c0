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
    """Median and its confidence interval, in ns."""
    with open(os.path.join(path, "new", "estimates.json")) as f:
        e = json.load(f)
    return e["median"]["point_estimate"], e["median"]["confidence_interval"]


def benches(group):
    """Maps each benchmark's function id to its directory."""
    out = {}
    gdir = os.path.join(root, group)
    for name in os.listdir(gdir):
        meta = os.path.join(gdir, name, "new", "benchmark.json")
        if os.path.exists(meta):
            with open(meta) as f:
                out[json.load(f)["function_id"]] = os.path.join(gdir, name)
    return out


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
    for b in sorted(ids):
        if group == "create":
            parts = b.split("/")
            if len(parts) != 3:
                continue  # left over from an older version of the benchmark
            p = f"{parts[0]}/file_create_set_len/{parts[2]}"
        else:
            p = peer
        if p not in ids:
            continue
        med, _ = estimates(ids[b])
        pmed, _ = estimates(ids[p])
        ratio = "—" if p == b else f"{med / pmed:.3f}"
        print(f"| {group} | {b} | {fmt(med)} | {ratio} | {p if p != b else ''} |")
