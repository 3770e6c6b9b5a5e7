"""scripts/recipe_confs.py and scripts/recipes_table.py: every YAML of conf/distill is a recipe of the tables (a
new one joins without an edit), the quickstart overrides its YAML names reach its runs, and --merge keeps the rows
of an earlier run."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import recipe_confs
import recipes_table

MERGED = ["rkd", "pkt", "sp", "cc", "nst", "fsp", "kdsvd", "ickd", "crd", "vid", "reviewkd"]


def test_every_yaml_is_a_recipe_and_fsp_kdsvd_name_their_quickstart_student():
    found = recipe_confs.all_recipes()
    assert set(MERGED) <= set(found) and {"kd", "feature", "attention"} <= set(found)
    assert set(recipes_table.ordered_recipes()) == set(found)
    for name in ("fsp", "kdsvd"):
        assert recipe_confs.quickstart_overrides(name) == ["student.model.channels=[64,128]"]
    assert recipe_confs.quickstart_overrides("rkd") == []


def test_a_new_yaml_joins_the_table_with_its_own_summary_keys_and_overrides(tmp_path, monkeypatch):
    (tmp_path / "newkd.yaml").write_text(
        "# NewKD, a method from a 2030 paper (Doe et al.):\n# quickstart overrides: a=1 b=[2,3]\n"
        "terms:\n  ce: {weight: 1.0}\n  newkd: {_target_: x.NewKD, weight: 2.0, beta: 3}\n"
    )
    monkeypatch.setattr(recipe_confs, "RECIPES_DIR", tmp_path)
    monkeypatch.setattr(recipes_table, "RECIPES_DIR", tmp_path)
    assert recipe_confs.all_recipes() == ["newkd"] and recipes_table.ordered_recipes() == ["newkd"]
    assert recipe_confs.quickstart_overrides("newkd") == ["a=1", "b=[2,3]"]
    what, paper, keys = recipes_table.describe("newkd")
    assert what == "NewKD, a method from a 2030 paper (Doe et al.)" and paper == "conf/distill/newkd.yaml"
    assert keys == "`terms.newkd.weight`, `terms.newkd.beta`"


def fake_run(calls):
    """runner.run replaced: records the overrides, returns accuracies without training."""

    def run(cfg, run_dir, overrides):
        calls.append(overrides)
        model = SimpleNamespace(test_acc=0.9)
        return SimpleNamespace(models={"teacher": model, "student": model, "baseline": model})

    return run


def test_runs_get_the_yaml_overrides_and_merge_keeps_earlier_rows(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(recipes_table.runner, "run", fake_run(calls))
    out = tmp_path / "out"
    recipes_table.main(["--seeds", "0", "--recipes", "kd", "attention", "--out", str(out), "trainer.epochs=1"])
    calls.clear()
    argv = ["--seeds", "0", "1", "--recipes", "fsp", "--merge", "--out", str(out), "trainer.epochs=1"]
    results = recipes_table.main([*argv, "fsp:distill.terms.fsp.weight=5"])
    fsp = [c for c in calls if "distill=fsp" in c]
    assert len(fsp) == 2 and all("student.model.channels=[64,128]" in c and "trainer.epochs=1" in c for c in fsp)
    assert all(c[-1] == "distill.terms.fsp.weight=5" for c in fsp)  # the command line's own override wins
    assert not any("student.model.channels=[64,128]" in c for c in calls if "distill=kd" in c)
    assert list(results) == ["kd", "attention", "fsp"] and len(results["fsp"]) == 2 and len(results["kd"]) == 1
    assert json.loads((out / "results.json").read_text()) == results
    assert "| `attention` |" in capsys.readouterr().out  # the printed table has the earlier run's rows too


def test_combine_prints_one_table_from_runs_of_separate_seeds(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(recipes_table.runner, "run", fake_run(calls))
    for seeds, out in ((["0", "1"], "a"), (["2"], "b")):
        recipes_table.main(["--seeds", *seeds, "--recipes", "kd", "pkt", "--out", str(tmp_path / out)])
    calls.clear()
    results = recipes_table.main(["--combine", str(tmp_path / "a"), str(tmp_path / "b")])
    assert not calls  # nothing trained
    assert [r["seed"] for r in results["pkt"]] == [0, 1, 2] and list(results) == ["kd", "pkt"]
    assert "| `pkt` |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"seeds \[0, 0, 1, 1\]"):  # a seed in two folders
        recipes_table.main(["--combine", str(tmp_path / "a"), str(tmp_path / "a")])
