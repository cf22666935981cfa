"""One config loader for every subcommand: what `dtl data` reads, what non-training commands
check, what a resume compares, and that `dtl --help` stays instant. Fast: no data is read."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dtl import DTLError, config
from dtl.cli import build_parser, data_config, load_config
from dtl.model.decode import InputPolicy, truthy
from dtl.train.phases import _same_run


def _data(*argv: str):
    return data_config(build_parser().parse_args(["data", "audit", *argv]))


def test_dtl_data_reads_the_recipes_block_of_that_kind_or_the_phase_default():
    dc, cache = _data("/data/ALL", "--kind", "aria", "--config", "real")
    assert dc == config.load(["real"]).phase2.data.__class__(**{**config.load(["real"]).phase2.data.__dict__,
                                                                 "root": "/data/ALL"})
    assert cache == ".dtl/cache"
    # the demo recipe's phase 1 is demo-cnmc (val 0.25): a real C-NMC audit gets phase 1's default block
    dc, _ = _data("/data/C-NMC", "--kind", "cnmc")
    assert dc.kind == "cnmc" and dc.val_fraction == config.Config().phase1.data.val_fraction == 0.2
    dc, _ = _data("/data/C-NMC", "--kind", "cnmc", "--val-fraction", "0.3", "--seed", "4", "--cache-dir", "/c")
    assert (dc.val_fraction, dc.split_seed) == (0.3, 4)


def test_dtl_data_never_reuses_another_kinds_root():
    """`--config real --kind imagefolder` without a root must not audit the Aria folder as an imagefolder."""
    dc, _ = _data("--kind", "imagefolder", "--config", "real")
    assert dc.root == "" and dc.kind == "imagefolder"
    with pytest.raises(SystemExit):
        _data("/x", "--kind", "nope")
    with pytest.raises(DTLError, match=r"phase2.data.protocol \(for kind aria\)='patient-level' is not valid"):
        _data("/x", "--kind", "aria", "--protocol", "patient-level")


def test_only_training_commands_require_the_init_weights_file():
    bad = ["-o", "phase1.init=file:/nowhere/w.safetensors"]
    with pytest.raises(DTLError, match="no such weights file"):
        load_config(build_parser().parse_args(["main", *bad]))
    for argv in (["report", *bad], ["promote", *bad], ["predict", "a.png", *bad]):
        assert load_config(build_parser().parse_args(argv)).phase1.init == "file:/nowhere/w.safetensors"
    with pytest.raises(DTLError, match="imagenet, scratch or file:PATH"):  # a bad value is still refused
        load_config(build_parser().parse_args(["report", "-o", "phase1.init=imagenett"]))


def test_a_resume_ignores_settings_that_do_not_change_training():
    a = config.to_dict(config.load(["demo"]))
    b = config.to_dict(config.load(["demo"], ["explain.n_per_class=9", "fuzzy.n_trials=3", "report_dir=/r",
                                             "register_strategy=none"]))
    c = config.to_dict(config.load(["demo"], ["phase1.lr_head=0.02"]))
    meta = {"config": a, "init_digest": "scratch"}
    assert _same_run({"config": b, "init_digest": "scratch"}, meta)
    assert not _same_run({"config": c, "init_digest": "scratch"}, meta)
    assert not _same_run({"config": a, "init_digest": "sha256:0123"}, meta)


def test_model_config_switches_read_false_strings_as_false():
    assert not truthy("false") and not truthy("OFF") and not truthy(0) and truthy("true") and truthy(True)
    assert InputPolicy.from_config({"allow_paths": "false"}).allow_paths is False


def test_the_recorded_command_line_carries_no_password(monkeypatch):
    from dtl.tracking.adapter import command_line

    monkeypatch.setattr(sys, "argv", ["dtl", "main", "-o", "tune.storage=postgresql://ann:s3cret@db.lab/optuna"])
    assert command_line() == "dtl main -o tune.storage=postgresql://ann:***@db.lab/optuna"


@pytest.mark.slow  # a subprocess (about a second)
def test_the_help_does_not_import_torch_mlflow_or_pandas():
    code = "import sys, dtl.cli; print(sorted(m for m in ('torch', 'mlflow', 'pandas', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
