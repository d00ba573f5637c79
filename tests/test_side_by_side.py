"""The side-by-side benchmarks: every implementation of a group computes the same meta-gradient; tables and README."""

import pytest
import torch

from benchmarks import side_by_side
from benchmarks.workload import Config, make_step


def test_first_order_group_runs_with_task_threads_and_writes_its_tables(tmp_path):
    # autograd, learn2learn and bilevel (loop and 2 task threads) on 2 tasks; run_group raises if any meta-gradient
    # differs from torch.autograd's
    threads = torch.get_num_threads()
    try:
        records = side_by_side.main(["--groups", "fo1", "--threads", "1", "2", "--repeats", "1", "--tasks", "2",
                                     "--out", str(tmp_path / "r.jsonl"), "--md", str(tmp_path / "r.md")])
    finally:
        torch.set_num_threads(threads)
    one, two = records
    assert set(one["median_s"]) == {"autograd:first_order:steps1:loop:T2", "learn2learn:first_order:steps1:loop:T2",
                                    "bilevel:first_order:steps1:loop:T2"}
    assert "bilevel:first_order:steps1:threads/workers2:T2" in two["median_s"]
    assert all(d <= side_by_side.GRAD_RTOL["fo1"] for r in records for d in r["grad_rel_diff"].values())
    assert two["fastest_peer"].startswith("learn2learn") and all(s > 0 for s in two["speedup"].values())
    md = (tmp_path / "r.md").read_text()
    assert "| MAML first order, 1 step | 2 | learn2learn" in md
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2


def test_a_wrong_implementation_is_refused(monkeypatch):
    # a peer that computed something else (here: the gradient of twice the loss) must not be timed as an equal
    real = side_by_side.make_step

    def doubled(cfg):
        step = real(cfg)
        return (lambda: {k: 2 * v for k, v in step().items()}) if cfg.impl == "learn2learn" else step

    monkeypatch.setattr(side_by_side, "make_step", doubled)
    with pytest.raises(RuntimeError, match="learn2learn.*differs"):
        side_by_side.run_group("fo1", 1, 1, 2)


@pytest.mark.parametrize("impl", ["higher", "torchopt"])
def test_second_order_peers_compute_bilevels_meta_gradient(impl):
    pytest.importorskip(impl)
    grads = [make_step(Config(impl=i, steps=2, tasks=2))() for i in (impl, "bilevel")]
    assert side_by_side.rel_diff(grads[0], grads[1]) <= side_by_side.GRAD_RTOL["maml1"]


def test_readme_block_is_replaced_and_a_missing_block_is_named(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{side_by_side.MARKERS[0]}\nold\n{side_by_side.MARKERS[1]}\ntail\n")
    side_by_side.write_readme(readme, "new table")
    assert readme.read_text() == f"# x\n{side_by_side.MARKERS[0]}\nnew table\n{side_by_side.MARKERS[1]}\ntail\n"
    readme.write_text("# no block\n")
    with pytest.raises(ValueError, match="side_by_side:start"):
        side_by_side.write_readme(readme, "t")


def test_per_task_overhead_compares_five_equal_implementations(tmp_path):
    from benchmarks import per_task_overhead

    threads = torch.get_num_threads()
    try:
        med = per_task_overhead.main(["--tasks", "2", "--rounds", "1", "--out", str(tmp_path / "o.jsonl")])
    finally:
        torch.set_num_threads(threads)
    assert set(med) == {"autograd", "learn2learn", "bilevel", "torch.func", "func inner, autograd outer"}
    assert all(v > 0 for v in med.values()) and (tmp_path / "o.jsonl").read_text().count("\n") == 1
