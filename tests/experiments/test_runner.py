"""Sweep bookkeeping: finished points are skipped, changed configs refused, tables have a fixed schema."""

import csv
import json

import pytest

from engram.experiments import runner
from engram.experiments.runner import COMMON_COLUMNS, SweepPoint, load_results, run_sweep, with_seeds


def _points(tiny_run):
    return [
        SweepPoint("moe", tiny_run("moe"), {"variant": "moe", "size": 0}),
        SweepPoint("engram", tiny_run("engram"), {"variant": "engram", "size": 1}),
    ]


def test_a_finished_point_is_not_rerun_and_an_unfinished_one_is(tmp_path, tiny_run, monkeypatch):
    out = tmp_path / "sweep"
    points = _points(tiny_run)
    run_sweep("toy", points[:1], out, progress=False)
    first = json.loads((out / "points" / "moe" / "result.json").read_text())

    trained = []
    real = runner.train

    def spy(run, **kw):
        trained.append(run.model.family)
        return real(run, **kw)

    monkeypatch.setattr(runner, "train", spy)
    rows = run_sweep("toy", points, out, progress=False)
    assert trained == ["engram"]  # only the point without a result trained
    assert json.loads((out / "points" / "moe" / "result.json").read_text()) == first
    assert [r["name"] for r in rows] == ["moe", "engram"]
    trained.clear()
    run_sweep("toy", points, out, progress=False)
    assert trained == []


def test_a_later_invocation_adds_to_the_table_without_dropping_earlier_points(tmp_path, tiny_run):
    out = tmp_path / "sweep"
    moe, engram = _points(tiny_run)
    run_sweep("toy", [moe, engram], out, progress=False)
    rows = run_sweep("toy", with_seeds([engram], [5]), out, progress=False)
    assert [r["name"] for r in rows] == ["moe", "engram", "engram-seed5"]
    assert [r["seed"] for r in load_results(out)] == [0, 0, 5]


def test_a_changed_config_for_an_existing_point_is_refused(tmp_path, tiny_run):
    out = tmp_path / "sweep"
    run_sweep("toy", _points(tiny_run)[:1], out, progress=False)
    changed = SweepPoint("moe", tiny_run("moe", steps=3), {"variant": "moe", "size": 0})
    with pytest.raises(ValueError, match="different config"):
        run_sweep("toy", [changed], out, progress=False)


def test_results_csv_and_json_share_the_common_schema_plus_sweep_coordinates(tmp_path, tiny_run):
    out = tmp_path / "sweep"
    rows = run_sweep("toy", _points(tiny_run), out, progress=False)
    doc = json.loads((out / "results.json").read_text())
    assert doc["sweep"] == "toy"
    assert doc["columns"] == list(COMMON_COLUMNS) + ["variant", "size"]
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == doc["columns"]
    assert [r["name"] for r in table] == ["moe", "engram"]
    assert load_results(out) == rows == doc["rows"]
    for r in rows:
        assert r["val_loss"] > 0 and r["tokens"] == 2 * 2 * 16
    assert rows[0]["engram"] == 0 and rows[1]["engram"] > 0 and rows[1]["family"] == "engram"


def test_each_point_records_its_exact_config_and_git_revision(tmp_path, tiny_run):
    out = tmp_path / "sweep"
    points = _points(tiny_run)
    run_sweep("toy", points, out, progress=False)
    for p in points:
        rec = json.loads((out / "points" / p.name / "point.json").read_text())
        res = json.loads((out / "points" / p.name / "result.json").read_text())
        assert rec["config"]["model"] == res["config"]["model"]
        assert rec["config"]["model"]["family"] == p.run.model.family
        assert rec["config"]["train"]["out_dir"] == str(out / "points" / p.name / "run")
        assert set(rec["git"]) == {"revision", "dirty"} and set(res["git"]) == {"revision", "dirty"}
        assert (out / "points" / p.name / "run" / "model" / "model.safetensors").is_file()


def test_git_revision_names_a_commit_and_a_dirty_flag(tmp_path):
    g = runner.git_revision()
    assert g["revision"] is None or (len(g["revision"]) == 40 and isinstance(g["dirty"], bool))
    assert runner.git_revision(tmp_path) == {"revision": None, "dirty": None}  # not a repository


def test_parallel_jobs_give_the_same_rows_as_sequential(tmp_path, tiny_run):
    seq = run_sweep("toy", _points(tiny_run), tmp_path / "seq", progress=False)
    par = run_sweep("toy", _points(tiny_run), tmp_path / "par", jobs=2, threads=1, progress=False)
    assert [r["name"] for r in par] == [r["name"] for r in seq]
    assert [r["val_loss"] for r in par] == pytest.approx([r["val_loss"] for r in seq], rel=1e-5)


def test_seeds_replicate_points_with_distinct_names_and_seeds(tiny_run):
    pts = with_seeds(_points(tiny_run), [0, 7])
    assert [p.name for p in pts] == ["moe", "moe-seed7", "engram", "engram-seed7"]
    assert [p.run.train.seed for p in pts] == [0, 7, 0, 7]
    assert pts[1].params == {"variant": "moe", "size": 0}


def test_duplicate_point_names_are_refused(tmp_path, tiny_run):
    p = _points(tiny_run)[0]
    with pytest.raises(ValueError, match="unique"):
        run_sweep("toy", [p, p], tmp_path, progress=False)


def test_learning_curves_read_the_points_eval_history(tmp_path, tiny_run):
    import dataclasses

    from engram.experiments.analyze import analyze_curves

    pts = _points(tiny_run)
    for p in pts:
        p.run.train = dataclasses.replace(p.run.train, steps=4, eval_every=2, ckpt_every=4)
    run_sweep("toy", pts, tmp_path / "s", progress=False)
    folders = [str(tmp_path / "s" / "points" / p.name) for p in pts]
    r = analyze_curves(folders, ["moe", "engram"], tmp_path / "curves.png")
    assert list(r["gap_to_first"]["engram"]) == [2, 4]
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "curves.json").is_file()
