"""benchmarks/allocator.py: one process per allocator, each refusing to run unless its allocator is the one in
effect; a table row per (allocator, impl) with positive numbers; an allocator that cannot be fetched is skipped
with a note; the allocator changes neither the meta-gradient nor, here, anything but speed and page faults.

Only glibc and glibc-thresholds run (nothing is fetched), on a two-task meta-batch.
"""

import json
import os

import pytest

from benchmarks import allocator

GIB = str(2**30)


def test_table_and_records(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(allocator.shutil, "which", lambda tool: None)  # jemalloc cannot be fetched
    out = tmp_path / "allocator.jsonl"
    rows = allocator.main(["--allocators", "glibc", "glibc-thresholds", "jemalloc", "--impls", "bilevel", "autograd",
                           "--tasks", "2", "--rounds", "1", "--repeats", "2", "--cache", str(tmp_path / "cache"),
                           "--out", str(out)])
    printed = capsys.readouterr().out

    pairs = [("glibc", "bilevel"), ("glibc", "autograd"), ("glibc-thresholds", "bilevel"),
             ("glibc-thresholds", "autograd")]
    assert [(r["allocator"], r["impl"]) for r in rows] == pairs
    for r in rows:
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_mib"] > 0 and r["minflt_per_step"] >= 0
        assert r["grad_rel_diff"] <= 1e-6 and r["grad_norm"] > 0   # same meta-gradient whatever the allocator
    base = {r["impl"]: r for r in rows if r["allocator"] == "glibc"}
    for r in rows:
        assert r["speedup_wall"] == pytest.approx(base[r["impl"]]["wall_s"] / r["wall_s"])
    # What the benchmark is about, and a check that the fault counts are the step's own: with the heap kept, the
    # per-task blocks stop faulting in afresh (tens of times fewer faults on this workload).
    faults = {(r["allocator"], r["impl"]): r["minflt_per_step"] for r in rows}
    assert faults[("glibc-thresholds", "bilevel")] < faults[("glibc", "bilevel")] / 2

    table = [line for line in printed.splitlines() if line.startswith("| glibc")]
    assert [tuple(cell.strip() for cell in line.split("|")[1:3]) for line in table] == pairs
    assert "uptime before:" in printed and "uptime after:" in printed
    assert "note: jemalloc: skipped (apt-get and dpkg not found, needed to fetch libjemalloc2)" in printed

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["child", "child", "summary"]
    child = {r["allocator"]: r for r in records if r["kind"] == "child"}
    assert child["glibc"]["env"] == {} and child["glibc"]["probe_from_heap"] is False
    assert child["glibc-thresholds"]["env"] == {"MALLOC_MMAP_THRESHOLD_": GIB, "MALLOC_TRIM_THRESHOLD_": GIB}
    assert child["glibc-thresholds"]["probe_from_heap"] is True
    for r in child.values():
        assert all(len(r["impls"][impl]["wall"]) == 2 for impl in ("bilevel", "autograd"))
    assert records[-1]["rows"] == rows


def test_child_environment_clears_inherited_allocator_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/elsewhere/libother.so")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    env = allocator.child_env("glibc", tmp_path, threads=1)
    assert not {"LD_PRELOAD", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES"} & set(env) and env["OMP_NUM_THREADS"] == "1"
    env = allocator.child_env("glibc-thresholds", tmp_path, threads=2)
    assert env["MALLOC_MMAP_THRESHOLD_"] == env["MALLOC_TRIM_THRESHOLD_"] == GIB and "MALLOC_ARENA_MAX" not in env


def test_checks_refuse_an_allocator_not_in_effect(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with pytest.raises(RuntimeError, match=r"jemalloc: LD_PRELOAD \(unset\) is not mapped"):
        allocator.check_preload("jemalloc")
    assert allocator.check_preload("glibc") is None
    # This process runs with whatever thresholds it was started with: claim the other setting.
    wrong = "glibc" if int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 0)) > allocator.PROBE_BYTES else "glibc-thresholds"
    with pytest.raises(RuntimeError, match="MALLOC_MMAP_THRESHOLD_ is not as intended"):
        allocator.check_thresholds(wrong)
