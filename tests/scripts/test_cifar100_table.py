"""scripts/cifar100_table.py: the published numbers are complete and sourced, each run gets the protocol and the
papers' settings, and --smoke runs the pairs through experiment=cifar100_bench on a CIFAR-100-format folder."""

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fake_data import make_cifar, skip_cifar_md5
from omegaconf import OmegaConf

from distill_runner.errors import instantiate
from distill_runner.models.features import INPUT, feature_shapes

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = json.loads((ROOT / "scripts" / "cifar100_published.json").read_text())
# The pairs of the CRD/DKD tables the issue names.
STANDARD_PAIRS = {
    ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"), ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"),
}  # fmt: skip
# A source is a repository's file at a commit, or a page's address (Papers with Code's copy of a paper's results).
COMMIT = re.compile(r"commit [0-9a-f]{40}")
PAGE = re.compile(r"https://paperswithcode\.com/paper/\S+, '[^']+'")


@pytest.fixture
def table():
    spec = importlib.util.spec_from_file_location("cifar100_table", ROOT / "scripts" / "cifar100_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_published_numbers_cover_the_standard_pairs_with_their_sources():
    pairs = {(p["teacher"], p["student"]): p for p in PUBLISHED["pairs"]}
    assert set(pairs) == STANDARD_PAIRS
    for (teacher, student), pair in pairs.items():
        assert (ROOT / "conf" / "teacher" / f"cifar_{teacher}.yaml").is_file()
        assert (ROOT / "conf" / "student" / f"cifar_{student}.yaml").is_file()
        numbers = pair["published"]
        assert all(50 < numbers[k] < 80 for k in ("teacher", "student", "kd", "crd"))
        assert numbers["teacher"] > numbers["student"] and numbers["kd"] > numbers["student"]
        assert (numbers["dkd"] is None) == ((teacher, student) == ("ResNet50", "vgg8"))  # not in the DKD tables
    for source in PUBLISHED["sources"].values():
        assert source["paper"] and (COMMIT.search(source["copied_from"]) or PAGE.match(source["copied_from"]))
    models = {name for pair in pairs for name in pair}
    assert set(PUBLISHED["stage_outputs"]["models"]) == models  # feature recipes find every model's layers


def fake_run(calls):
    """runner.run replaced: records the composed config, returns results without training."""

    def run(cfg, run_dir, overrides):
        calls.append(cfg)
        model = SimpleNamespace(test_acc=0.5)
        return SimpleNamespace(stages={}, models={"teacher": model, "student": model, "baseline": model})

    return run


@pytest.mark.slow
def test_each_run_gets_the_protocol_the_papers_settings_and_a_published_teacher(table, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(table.runner, "run", fake_run(calls))
    checkpoint = tmp_path / "teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    table.main(["--recipes", "kd", "dkd", "--teachers", str(tmp_path / "teachers"), "--out", str(tmp_path / "out")])
    assert len(calls) == 2 * len(STANDARD_PAIRS)  # every pair, both recipes, composed under cifar100_bench
    by_pair = {(c.teacher.name, c.student.name, c.distill.terms.get("dkd") is not None): c for c in calls}
    for pair in PUBLISHED["pairs"]:
        beta = float(pair["overrides"]["dkd"][0].split("=")[1])
        assert by_pair[pair["teacher"], pair["student"], True].distill.beta == beta
    kd, dkd = by_pair["resnet56", "resnet20", False], by_pair["resnet56", "resnet20", True]
    mv2_kd, mv2_dkd = by_pair["vgg13", "MobileNetV2", False], by_pair["vgg13", "MobileNetV2", True]
    assert kd.distill.alpha == 0.9 and kd.distill.temperature == 4.0 and dkd.distill.beta == 2.0
    assert mv2_dkd.distill.beta == 6.0 and mv2_kd.trainer.optimizer.lr == 0.01 and kd.trainer.optimizer.lr == 0.05
    assert kd.teacher.checkpoint == str(checkpoint.resolve()) and kd.teacher.epochs == 0
    assert mv2_kd.teacher.checkpoint is None and mv2_kd.teacher.epochs == 240  # none published here: trained
    assert kd.trainer.epochs == 240 and kd.eval.test_every_epoch
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| resnet56 -> resnet20 | 50.00 (50.00) / 72.34 | 50.00 (50.00) / 69.06 | 50.00 (50.00) / 70.66 |" in text


def test_feature_recipes_read_the_stage_outputs_repdistiller_uses(table, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(table.runner, "run", fake_run(calls))
    table.main(["--recipes", "feature", "attention", "--pairs", "vgg13:MobileNetV2", "--out", str(tmp_path)])
    feature, attention = calls
    assert [dict(p) for p in feature.distill.terms.feature.pairs] == [{"student": "blocks.2", "teacher": "relu2"}]
    assert feature.distill.terms.feature.weight == 100 and attention.distill.terms.attention.weight == 1000
    pairs = [(p.student, p.teacher) for p in attention.distill.terms.attention.pairs]
    assert pairs == [("blocks.1", "relu1"), ("blocks.2", "relu2"), ("blocks.4", "relu3"), ("blocks.6", "relu4")]
    assert "| vgg13 -> MobileNetV2 |" in (tmp_path / "table.md").read_text()


def test_unknown_pairs_and_recipes_are_refused(table, capsys):
    for argv in (["--pairs", "resnet8:resnet20"], ["--recipes", "no_such_recipe"]):
        with pytest.raises(SystemExit):
            table.main(argv)
        assert "unknown recipe or pair" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_runs_the_pairs_and_prints_ours_beside_the_published_numbers(table, tmp_path, monkeypatch):
    """10 classes at 8 px keep each pair to a few seconds; the test budget allows six pairs: every teacher family but
    ResNet50 (24M parameters: about 10 s a pair even so) and every student family. The other pairs' configs are
    composed above; `--smoke` by hand runs all twelve."""
    skip_cifar_md5(monkeypatch)
    make_cifar(tmp_path / "data", "cifar100", per_class=1, num_classes=10)
    pairs = ["resnet56:resnet20", "wrn_40_2:wrn_16_2", "vgg13:vgg8", "resnet32x4:ShuffleV2", "wrn_40_2:ShuffleV1",
             "vgg13:MobileNetV2"]  # fmt: skip
    rows = table.main(["--smoke", "--recipes", "dkd", "--pairs", *pairs, "--out", str(tmp_path / "out"),
                       f"dataset.root={tmp_path / 'data'}", "dataset.download=false", "dataset.image_size=8",
                       "eval.cka_samples=8"])  # fmt: skip
    assert [f"{r['teacher']}:{r['student']}" for r in rows] == pairs
    for row in rows:
        for column in ("teacher", "student", "dkd"):
            ours = row["ours"][column]
            assert 0 <= ours["last"] <= ours["best"] <= 1 and ours["best_epoch"] == 1
    text = (tmp_path / "out" / "table.md").read_text()
    assert "SMOKE RUN" in text and "| wrn_40_2 -> ShuffleV1 |" in text and "/ 76.70 |" in text
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == rows


def test_the_relation_methods_published_numbers_are_there_with_their_sources():
    for pair in PUBLISHED["pairs"]:
        numbers = pair["published"]
        same = "same architecture" in pair["table"]
        for column in ("sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "nst"):
            assert 55 < numbers[column] < 80  # RepDistiller's README: both tables
        assert (numbers["ickd"] is not None) == same  # ICKD's README: the same-architecture table only
        assert (numbers["fsp"] is not None) == (same and (pair["teacher"], pair["student"]) != ("wrn_40_2", "wrn_40_1"))
    assert PUBLISHED["pairs"][2]["published"]["nst"] == 73.30 and PUBLISHED["pairs"][2]["student"] == "resnet8x4"
    assert {"sp, cc, vid, rkd, pkt, ab, ft, fsp, nst", "ickd"} <= set(PUBLISHED["sources"])
    assert set(PUBLISHED["pooled_outputs"]["models"]) == set(PUBLISHED["stage_outputs"]["models"])


def test_relation_recipes_read_each_pairs_layers_and_fsp_skips_different_channels(table, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(table.runner, "run", fake_run(calls))
    recipes = ["rkd", "sp", "nst", "crd", "fsp", "reviewkd"]
    table.main(["--recipes", *recipes, "--pairs", "vgg13:vgg8", "vgg13:MobileNetV2", "--out", str(tmp_path)])
    assert len(calls) == 2 * len(recipes) - 1  # fsp pairs maps of equal channels: not on vgg13 -> MobileNetV2
    same, different = calls[: len(recipes)], calls[len(recipes) :]
    rkd, sp, nst, crd, fsp, reviewkd = (c.distill.terms for c in same)
    assert (rkd.rkd.student, rkd.rkd.teacher, sp.sp.student, sp.sp.teacher) == ("pool4", "pool4", "relu4", "relu4")
    assert [(p.student, p.teacher) for p in fsp.fsp.pairs] == [(f"relu{i}", f"relu{i}") for i in range(1, 5)]
    assert (crd.crd.student_layer, crd.crd.teacher_layer) == ("pool4", "pool4") and len(nst.nst.pairs) == 4
    assert [p.teacher for p in reviewkd.reviewkd.pairs] == ["relu1", "relu2", "relu3", "relu4", "pool4"]
    mv2_rkd, mv2_nst = different[0].distill.terms.rkd, different[2].distill.terms.nst
    assert (mv2_rkd.student, mv2_rkd.teacher) == ("avgpool", "pool4") and mv2_nst.pairs[0].student == "blocks.1"
    text = (tmp_path / "table.md").read_text()
    assert "/ 72.68 |" in text and "| vgg13 -> MobileNetV2 |" in text  # SP on vgg13 -> vgg8: RepDistiller's 72.68


def source_of(column: str) -> dict | None:
    """The source whose key (a comma-separated list of columns) names this column."""
    for key, source in PUBLISHED["sources"].items():
        if column in key.split(", "):
            return source
    return None


def test_every_published_number_has_a_source_and_every_gap_says_why():
    columns = {c for pair in PUBLISHED["pairs"] for c in pair["published"]}
    missing = PUBLISHED["not_yet_sourced"]
    for column in columns:
        numbers = [pair["published"].get(column) for pair in PUBLISHED["pairs"]]
        assert all(n is None or 50 < n < 80 for n in numbers), column
        source = source_of(column)
        if any(n is not None for n in numbers):
            assert source is not None, f"{column}: published numbers without a source"
        if None in numbers:  # a gap: named in not_yet_sourced, or its source's notes say which pairs are null
            assert f"{column}:" in missing or (source and "null" in source.get("notes", "")), column
    for method in ("reviewkd", "ofd", "simkd", "catkd", "sdd_kd", "sdd_dkd", "sdd_nkd", "wsld", "srd", "crld"):
        assert method in columns and method in missing  # the issue-29/30 methods: a column each, their gaps named
    pairs = {(p["teacher"], p["student"]): p["published"] for p in PUBLISHED["pairs"]}
    assert pairs["resnet32x4", "resnet8x4"]["simkd"] == 78.08  # SimKD's README, f=2 (issue 30 quotes it)
    assert pairs["vgg13", "vgg8"]["kd_dot"] == 73.77 and pairs["ResNet50", "vgg8"]["sdd_dkd"] == 75.86


def test_recipes_are_conf_distill_recipes_with_published_columns():
    columns = {c for pair in PUBLISHED["pairs"] for c in pair["published"]}
    for name, spec in PUBLISHED["recipes"].items():
        assert (ROOT / "conf" / "distill" / f"{name}.yaml").is_file(), name
        assert spec.get("column") is None or spec["column"] in columns, name
        assert spec["source"]


def test_sdd_and_simkd_read_the_layers_and_classifiers_of_their_official_codes(table, tmp_path, monkeypatch):
    """SDD: each model's map before its final pooling (the input of avgpool / vgg's pool4) through its own
    classifier; SimKD: the last stage's map (feat[-2]) of both and the teacher's classifier."""
    calls = []
    monkeypatch.setattr(table.runner, "run", fake_run(calls))
    recipes = ["sdd_kd", "sdd_dkd", "sdd_nkd", "simkd"]
    table.main(["--recipes", *recipes, "--pairs", "resnet56:resnet20", "vgg13:MobileNetV2", "--out", str(tmp_path)])
    (kd, dkd, nkd, simkd), (mv2_kd, mv2_dkd, mv2_nkd, mv2_simkd) = calls[:4], calls[4:]
    sdd = mv2_kd.distill.terms.sdd
    assert (sdd.student, sdd.student_head, sdd.teacher, sdd.teacher_head) == (
        "avgpool:input", "classifier", "pool4:input", "classifier")  # fmt: skip
    assert (kd.distill.terms.sdd.student, kd.distill.terms.sdd.teacher_head) == ("avgpool:input", "fc")
    assert dkd.distill.beta == 2.0 and nkd.distill.terms.sdd.gamma == 2.0  # SDD's res56_res20.yaml: DKD.BETA 2
    assert mv2_dkd.distill.beta == 6.0 and mv2_nkd.distill.terms.sdd.gamma == 6.0
    term = mv2_simkd.distill.terms.simkd
    assert (term.student, term.teacher, term.teacher_head, term.factor) == ("blocks.6", "relu4", "classifier", 2)
    assert (simkd.distill.terms.simkd.student, simkd.distill.terms.simkd.teacher) == ("layer3", "layer3")
    assert mv2_simkd.distill.terms.ce.weight == 0  # -c 0 -d 0 -b 1
    text = (tmp_path / "table.md").read_text()
    assert "/ 68.79 | " in text and "/ 70.25 | " in text and "/ 69.50 | " in text  # SDD's README image


@pytest.mark.slow
def test_smoke_runs_sdd_and_simkd_on_a_zoo_pair(table, tmp_path, monkeypatch):
    skip_cifar_md5(monkeypatch)
    make_cifar(tmp_path / "data", "cifar100", per_class=1, num_classes=10)
    rows = table.main(["--smoke", "--recipes", "sdd_kd", "simkd", "--pairs", "resnet56:resnet20",
                       "--out", str(tmp_path / "out"), f"dataset.root={tmp_path / 'data'}", "dataset.download=false",
                       "dataset.image_size=8", "eval.cka_samples=8"])  # fmt: skip
    (row,) = rows
    for column in ("sdd_kd", "simkd"):
        ours = row["ours"][column]
        assert 0 <= ours["last"] <= ours["best"] <= 1 and ours["best_epoch"] == 1
    assert "| resnet56 -> resnet20 |" in (tmp_path / "out" / "table.md").read_text()


def test_the_newly_sourced_ofd_number_is_on_its_pair_only():
    pairs = {(p["teacher"], p["student"]): p["published"] for p in PUBLISHED["pairs"]}
    assert pairs["resnet32x4", "resnet8x4"]["ofd"] == 74.95  # DKD's figure in mdistiller (.github/dkd.png)
    assert [p for p, n in pairs.items() if n["ofd"] is not None] == [("resnet32x4", "resnet8x4")]


@pytest.mark.slow
def test_each_models_classifier_takes_the_map_its_pooling_reads():
    """What SDD reads on every zoo model: the pooling's input, whose channels the named classifier maps to
    the logits (a wrong name or map would otherwise show only in a full run). Slow: it builds all 15 models."""
    heads, pooled = PUBLISHED["classifiers"]["models"], PUBLISHED["pooled_outputs"]["models"]
    assert set(heads) == set(PUBLISHED["stage_outputs"]["models"])
    for name, head in heads.items():
        node = OmegaConf.load(ROOT / "conf" / "student" / f"cifar_{name}.yaml").model
        model = instantiate(node, "model", num_classes=10, in_channels=3, image_size=8)
        tap = f"{pooled[name]}{INPUT}"
        channels = feature_shapes(model, [tap], 3, 8)[tap][0]
        logits = dict(model.named_modules())[head].eval()(torch.zeros(2, channels))
        assert logits.shape == (2, 10), name


ISSUE_29_30 = ["ofd", "ab", "ft", "catkd", "srd", "crld", "wsld", "sdd_kd", "simkd", "crd", "reviewkd", "ickd"]


@pytest.mark.slow
def test_check_binds_each_recipe_to_a_pairs_models_and_lists_what_would_fail(table, tmp_path, monkeypatch, capsys):
    """--check trains nothing: every recipe composed, validated and bound on vgg13 -> MobileNetV2 (two families
    whose layer names share nothing with the quickstart's); a wrong layer is one line naming pair and recipe."""
    skip_cifar_md5(monkeypatch)
    make_cifar(tmp_path / "data", "cifar100", per_class=1, num_classes=10)
    data = [f"dataset.root={tmp_path / 'data'}", "dataset.download=false"]
    assert table.main([*data, "--check", "--pairs", "vgg13:MobileNetV2", "--recipes", *ISSUE_29_30]) == []
    assert "0 of the runs would fail" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bad = [*data, "distill.terms.catkd.student=nope"]
        table.main([*bad, "--check", "--pairs", "vgg13:vgg8", "--recipes", "catkd"])
    out = capsys.readouterr().out
    assert "1 of the runs would fail" in out and "vgg13 -> vgg8 catkd: ConfigError:" in out and "nope" in out


def test_catkd_gets_its_pairs_settings_and_ofd_skips_a_student_without_pre_relu_taps(table, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(table.runner, "run", fake_run(calls))
    table.main(["--recipes", "ofd", "catkd", "srd", "--pairs", "resnet56:resnet20", "resnet32x4:ShuffleV2",
                "--out", str(tmp_path)])  # fmt: skip
    ofd, catkd, srd, shuffle_catkd, shuffle_srd = calls  # no OFD run on ShuffleV2
    assert ofd.distill.terms.ofd.pairs == "stages" and shuffle_catkd.student.name == "ShuffleV2"
    assert (catkd.distill.terms.catkd.weight, catkd.distill.terms.catkd.student) == (0.7, "avgpool:input")
    assert shuffle_catkd.distill.terms.catkd.weight == 15.0  # no official config for the pair: the recipe's own
    assert (srd.distill.terms.srd.student, shuffle_srd.distill.terms.srd.student) == ("layer3", "layer3")
