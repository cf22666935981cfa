"""The command line and the MLproject as a user runs them (real subprocesses)."""

import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import mlflow
import pytest
import tomllib
import yaml

from dtl.tracking.adapter import connect
from tests.conftest import PYTHON, ROOT, demo_overrides


def dtl(*args, cwd=None, env=None, timeout=600):
    return subprocess.run([PYTHON, "-m", "dtl", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.mark.slow
def test_unknown_backbone_lists_valid_names(workspace):
    p = dtl("main", "--backbones", "resnet5o")
    assert p.returncode == 2
    assert "unknown backbone 'resnet5o'" in p.stderr and "resnet50, efficientnet_b3, inception_v3" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_missing_data_root_names_the_expected_layout(workspace):
    p = dtl("main", "--phase2-root", str(workspace / "nowhere"), "-o", "backbones=[test_resnet]")
    assert p.returncode == 2 and "Original/{Benign,Early,Pre,Pro}" in p.stderr


@pytest.mark.slow
def test_unreachable_tracking_server_fails_before_training(workspace):
    p = dtl("main", "--tracking-uri", "http://127.0.0.1:9", timeout=120)
    assert p.returncode == 2
    assert "http://127.0.0.1:9 is not reachable" in p.stderr
    assert not (workspace / ".dtl" / "runs").exists()


@pytest.mark.slow
def test_credentials_never_reach_the_error_message(workspace):
    p = dtl("phase1", "--tracking-uri", "postgresql://dtl:s3cret@127.0.0.1:9/mlflow", timeout=120)
    assert p.returncode == 2 and "s3cret" not in p.stderr and "dtl:***@" in p.stderr


def test_redact_strips_every_password_and_keeps_the_rest():
    """What the CLI, the params and the study tags show of a storage or tracking URL."""
    from dtl.tracking.adapter import redact

    text = "postgresql://dtl:s3cret@127.0.0.1:5432/optuna and http://me:pa55@host/x, sqlite:///a.db"
    out = redact(text)
    assert out == "postgresql://dtl:***@127.0.0.1:5432/optuna and http://me:***@host/x, sqlite:///a.db"
    assert "s3cret" not in out and "pa55" not in out


@pytest.mark.slow
def test_malformed_optuna_storage_url(workspace, cache_dir):
    o = demo_overrides(cache_dir, workspace, **{"tune.storage": "notaurl"})
    p = dtl("phase1", *[x for kv in o for x in ("-o", kv)])
    assert p.returncode == 2 and "Optuna storage 'notaurl' is not usable" in p.stderr and "journal:" in p.stderr


@pytest.mark.slow
def test_phase2_double_without_a_phase1_study_and_evaluate_without_a_target(workspace, cache_dir):
    o = demo_overrides(cache_dir, workspace)
    p = dtl("phase2", *[x for kv in o for x in ("-o", kv)])
    assert p.returncode == 2 and "holds no finished phase-1 study of test_resnet" in p.stderr
    assert "mlflow run . -e phase1 --experiment-name all-dtl-demo" in p.stderr and "Traceback" not in p.stderr
    p = dtl("evaluate")
    assert p.returncode == 2 and "--checkpoint FILE or --run" in p.stderr


@pytest.mark.parametrize("args, needle", [
    (["main", "--n-trials", "many"], "invalid _int value"),
    (["data", "audit", "x", "--kind", "nope"], "invalid choice"),
    (["phase2", "--strategy", "triple"], "invalid choice"),
    (["nonsense"], "invalid choice"),
])
@pytest.mark.slow  # a subprocess per case (fast, but the fast tier runs no subprocess)
def test_argument_errors(args, needle):
    p = dtl(*args)
    assert p.returncode == 2 and needle in p.stderr


@pytest.mark.slow  # a subprocess
def test_tune_help_documents_the_knobs():
    p = dtl("tune", "--help")
    for knob in ("--n-trials", "--storage", "tune.pruner", "search_space", "--phase"):
        assert knob in p.stdout


def test_mlproject_entry_points_are_one_line_cli_calls():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    eps = spec["entry_points"]
    assert set(eps) == {"main", "phase1", "phase2", "evaluate", "promote", "report", "predict", "fuzzy", "explain"}
    for name, ep in eps.items():
        assert ep["command"].startswith(f"python -m dtl {name}")
        for param in ep["parameters"]:
            assert "{" + param + "}" in ep["command"], (name, param)
    assert "phase1" in eps["phase2"]["parameters"]


def test_conda_env_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(d for d in pip if d != "-e .") == sorted(deps)
    assert "-e ." in pip


@pytest.mark.slow
def test_mlflow_run_phase1_then_phase2_from_its_run_id(workspace, cache_dir):
    """`mlflow run . -e phase1`, then `mlflow run . -e phase2 -P phase1=<run id>`, as a user types them."""
    mlflow_bin = str(Path(PYTHON).parent / "mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace}/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "mlrun",
           "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}"}  # `python` = this environment's
    common = ["-P", "backbones=test_resnet", "-P", "n_trials=1", "-P", "epochs=1", "-P",
              f"storage=sqlite:///{workspace}/optuna.db"]
    p1 = subprocess.run([mlflow_bin, "run", str(ROOT), "-e", "phase1", "--env-manager", "local", *common],
                        capture_output=True, text=True, env=env, timeout=600)
    assert p1.returncode == 0, p1.stderr[-3000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name("mlrun")
    study = mlflow.search_runs([exp.experiment_id], "tags.`dtl.role` = 'study'", output_format="list")
    assert len(study) == 1 and study[0].data.tags["phase"] == "phase1"
    outer = mlflow.search_runs([exp.experiment_id], "tags.`dtl.role` = 'pipeline'", output_format="list")
    assert len(outer) == 1 and outer[0].info.status == "FINISHED"  # MLflow's own run holds the study
    # the study is a top-level row of the runs table, linked to the launcher's run by a tag
    assert study[0].data.tags["dtl.pipeline_run"] == outer[0].info.run_id
    assert "mlflow.parentRunId" not in study[0].data.tags
    p2 = subprocess.run([mlflow_bin, "run", str(ROOT), "-e", "phase2", "--env-manager", "local", *common,
                         "-P", f"phase1={study[0].info.run_id}"], capture_output=True, text=True, env=env, timeout=600)
    assert p2.returncode == 0, p2.stderr[-3000:]
    p2s = mlflow.search_runs([exp.experiment_id], "tags.phase = 'phase2' and tags.`dtl.role` = 'study'",
                             output_format="list")
    assert len(p2s) == 1 and p2s[0].data.tags["init"] == f"phase1:{study[0].info.run_id}"
    assert "test_accuracy" in p2s[0].data.metrics


@pytest.mark.slow
def test_data_audit_json_and_preview(workspace, cache_dir):
    from dtl.data import demo

    root = demo.make_aria(cache_dir)
    p = dtl("data", "audit", str(root), "--kind", "aria", "--json", "--cache-dir", str(cache_dir))
    assert p.returncode == 0, p.stderr
    import json

    a = json.loads(p.stdout)
    for key in ("n_images", "classes", "duplicates_removed", "splits", "n_patients", "patient_overlap",
                "unreadable", "missing_listed", "sizes"):
        assert key in a
    assert a["duplicates_removed"] == 2 and a["n_patients"]["train"] is None
    human = dtl("data", "audit", str(root), "--kind", "aria", "--cache-dir", str(cache_dir))
    assert "duplicates removed 2" in human.stdout and "Benign" in human.stdout
    out = workspace / "prev.png"
    p = dtl("data", "preview", str(root), "--kind", "aria", "--out", str(out), "--size", "48", "--per-class", "4",
            "--cache-dir", str(cache_dir))
    assert p.returncode == 0 and out.stat().st_size > 5000


@pytest.mark.slow
def test_evaluate_a_study_run_from_the_cli(workspace, cache_dir):
    o = demo_overrides(cache_dir, workspace, **{"phase1.n_trials": 1, "phase1.epochs": 1})
    flags = [x for kv in o for x in ("-o", kv)]
    assert dtl("phase1", *flags).returncode == 0
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name("all-dtl-demo")
    study = mlflow.search_runs([exp.experiment_id], "tags.`dtl.role` = 'study'", output_format="list")[0]
    p = dtl("evaluate", "--phase", "phase1", "--run", study.info.run_id, *flags)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "test_macro_f1" in p.stdout and "95% CI" in p.stdout
    ev = mlflow.search_runs([exp.experiment_id], "tags.`dtl.role` = 'evaluate'", output_format="list")
    assert len(ev) == 1 and "test_balanced_accuracy_ci_low" in ev[0].data.metrics


def mlflow_run(entry: str, workspace: Path, cache_dir: Path, *params: str, experiment: str = "job",
               popen: bool = False):
    """`mlflow run <checkout> -e <entry> --env-manager local --experiment-name <experiment>` on
    the tiny demo (one backbone, one trial of one epoch), as a user types it."""
    o = demo_overrides(cache_dir, workspace, **{"cards_dir": str(workspace / "cards"), "bootstrap": 20})
    o = [x for x in o if not x.startswith(("tune.storage", "backbones", "phase1.", "phase2."))]
    cmd = [str(Path(PYTHON).parent / "mlflow"), "run", str(ROOT), "-e", entry, "--env-manager", "local",
           "--experiment-name", experiment, "-P", "backbones=test_resnet", "-P", "n_trials=1", "-P", "epochs=1",
           "-P", f"storage=sqlite:///{workspace}/optuna.db", "-P", "overrides=" + " ".join(o), *params]
    env = {**os.environ, "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}",
           # a tiny study lasts about a second: sample often enough that each one logs at least once
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_mlflow_run_main_then_phase2_on_defaults_keeps_the_job_in_one_experiment(workspace, cache_dir):
    """Runs, logged models (with their metrics linked to model and dataset) and registered
    versions (with the card as description) of `mlflow run -e main`, then `-e phase2` with no
    `phase1`: it takes the experiment's latest phase-1 study, says which and tags it."""
    main = mlflow_run("main", workspace, cache_dir)
    assert main.returncode == 0, main.stderr[-3000:]
    p2 = mlflow_run("phase2", workspace, cache_dir)
    assert p2.returncode == 0, p2.stderr[-3000:]
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("job")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert not client.search_runs(["0"]), "nothing of the job in MLflow's Default experiment"
    p1 = [r for r in runs if r.data.tags.get("dtl.role") == "study" and r.data.tags["phase"] == "phase1"]
    assert len(p1) == 1
    assert f"double transfer from phase-1 study run {p1[0].info.run_id}" in p2.stdout
    outer = [r for r in runs if r.data.tags.get("dtl.job") == "phase2"]
    assert outer[0].data.tags["dtl.phase1_source.test_resnet"] == p1[0].info.run_id
    # the same start as main's phase 2: its study (complete) is resumed, not trained again
    p2s = [r for r in runs if r.data.tags.get("dtl.role") == "study" and r.data.tags["phase"] == "phase2"]
    assert len(p2s) == 1 and p2s[0].data.tags["init"] == f"phase1:{p1[0].info.run_id}"
    models = client.search_logged_models([exp.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == p2s[0].info.run_id
    for m in models:
        linked = {(x.key, x.dataset_name) for x in m.metrics if x.model_id == m.model_id}
        assert {("test_accuracy", "phase2-test"), ("val_macro_f1", "phase2-val")} <= linked, linked
    versions = client.search_model_versions("name='all-dtl'")
    assert {v.source for v in versions} == {f"models:/{m.model_id}" for m in models}  # the sqlite registry links by source
    assert {client.get_run(v.run_id).info.experiment_id for v in versions} == {exp.experiment_id}
    champ = client.get_model_version_by_alias("all-dtl", "champion")
    assert champ.description.startswith("# Model card: all-dtl v") and "NOT for diagnosis" in champ.description
    # what a person reads in the log: a plain line per trial (no carriage returns off a terminal),
    # a summary table at the end; and system metrics on every study run
    assert "phase1 test_resnet: trial 0 complete value" in main.stderr and "\r" not in main.stderr
    assert "test macro-F1" in main.stdout and "champion" in main.stdout
    for r in p1 + p2s:
        assert any(k.startswith("system/cpu_utilization") for k in r.data.metrics), sorted(r.data.metrics)


@pytest.mark.slow
def test_a_killed_mlflow_run_is_ended_killed_by_the_next_invocation(workspace, cache_dir):
    """SIGKILL to the process group of `mlflow run -e main` part-way; the next invocation ends
    MLflow's outer run of the killed one KILLED, as it does the project's own runs."""
    client = connect(os.environ["MLFLOW_TRACKING_URI"], "job").client  # the store exists before two processes poll it
    proc = mlflow_run("main", workspace, cache_dir, popen=True)
    deadline = time.time() + 300
    trials = []
    while not trials and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        exp = client.get_experiment_by_name("job")
        if exp is not None:
            trials = client.search_runs([exp.experiment_id], "tags.`dtl.role` = 'trial'")
    assert trials, proc.stdout.read()[-3000:] if proc.poll() is not None else "no trial started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed = client.search_runs([exp.experiment_id], "tags.`dtl.role` = 'pipeline'")
    assert len(killed) == 1 and killed[0].info.status == "RUNNING"
    again = mlflow_run("phase1", workspace, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    first = client.get_run(killed[0].info.run_id)
    assert first.info.status == "KILLED" and "process that ran it was gone" in first.data.tags["dtl.ended_by"]
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")


def _on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run `dtl ...` with stderr on a pseudo-terminal, as a person at a shell sees it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column window
    proc = subprocess.Popen([PYTHON, "-m", "dtl", *args], stdout=subprocess.DEVNULL, stderr=slave, cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=600), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_live_progress_line_on_a_terminal_and_quiet_turns_it_off(workspace, cache_dir):
    o = demo_overrides(cache_dir, workspace, **{"phase1.n_trials": 1, "phase1.epochs": 2})
    flags = [x for kv in o for x in ("-o", kv)]
    rc, err = _on_a_terminal(["phase1", *flags], workspace)
    assert rc == 0, err[-2000:]
    line = err[err.rindex("phase1 test_resnet"):]
    assert "\r" in err and "1/1" in line and "best=" in line and "pruned=0" in line, line[:300]
    assert "epoch=2/2" in err  # the epoch is shown while the trial runs
    rc, err = _on_a_terminal(["phase1", "--quiet", *flags, "-o", "experiment=quiet",
                              "-o", f"tune.storage=sqlite:///{workspace}/quiet.db"], workspace)
    assert rc == 0 and "phase1 test_resnet" not in err and "caching" not in err, err[-2000:]


@pytest.mark.slow
def test_promote_ranks_only_versions_of_the_recipes_data(workspace, cache_dir):
    """A version trained on other data (here: another digest and split protocol, with a better
    validation score) does not compete for `champion` unless asked for with --any-data."""
    import json

    from dtl import config, pipeline
    from dtl.tracking.adapter import connect

    o = demo_overrides(cache_dir, workspace, **{"phase1.n_trials": 1, "phase2.n_trials": 1, "phase1.epochs": 1,
                                                "phase2.epochs": 1, "cards_dir": str(workspace / "cards")})
    res = pipeline.main(config.load(["demo"], o), report=False)
    t = connect(f"sqlite:///{workspace}/mlflow.db", "all-dtl-demo")
    v1 = t.client.get_model_version("all-dtl", res.versions["test_resnet"])
    other = t.client.create_model_version(
        "all-dtl", v1.source, run_id=v1.run_id,
        tags={**v1.tags, "data_digest": "0" * 64, "split_protocol": "image-level", "metric.val_macro_f1": "0.999",
              "dtl.model_uri": "other", "dtl.source": "other-run:other"})  # another source: its own candidate
    unmasked = t.client.create_model_version(  # same data and split, the annotation corner left in
        "all-dtl", v1.source, run_id=v1.run_id,
        tags={**v1.tags, "annotation_mask": "off", "metric.val_macro_f1": "0.998", "dtl.model_uri": "unmasked",
                    "dtl.source": "unmasked-run:unmasked"})
    args = ["promote", "--config", "demo"] + [x for kv in o for x in ("-o", kv)]
    p = dtl(*args, cwd=workspace)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout[p.stdout.index("{"):])
    assert out["champion"] == str(v1.version)
    assert str(other.version) not in out["ranked"] and str(unmasked.version) not in out["ranked"]
    assert "candidates: versions trained on demo-aria data digest" in p.stdout
    p = dtl(*args, "--any-data", cwd=workspace)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout[p.stdout.index("{"):])["champion"] == str(other.version), p.stdout
    assert v1.tags["annotation_mask"] == "on"  # the demo Aria carries a class-coloured stamp: masked
