"""What users meet when something goes wrong: each known failure of `python -m pitsearch`, `pitsearch.report` and
`pitsearch.export` is one `error: <field or path>: <problem>` line with its exit status (2 bad input, 3 lost
server, 130 Ctrl-C) and never a traceback; printed text is never read as Rich markup; no password reaches a file
or the terminal. The CLI cases run as users run them, in a subprocess (conftest.run_cli)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, TINY_SWEEP, journal_study, run_cli, write_sweep
from optuna.trial import TrialState

from pitsearch.errors import ConfigError
from pitsearch.retry import ServiceUnavailable

FAST = [*TINY, "train.epochs=1"]
SECRET = "pw-s3cr3t"   # distinctive: found only where a password leaked


def one_sweep(config_dir: Path, name: str, extra: str = "") -> Path:
    """A one-cell tiny sweep file (conv, seed 0)."""
    write_sweep(config_dir, name, TINY_SWEEP.format(name=name, epochs=1, workers=1, seeds="[0]", pruner="{name: none}",
                                                    extra=extra, space="    model.pool: {choices: [conv]}"))
    return config_dir


def assert_one_error_line(result, status: int, prefix: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status, f"exit {result.returncode}\n{result.stderr}"
    assert len(lines) == 1 and lines[0].startswith(f"error: {prefix}"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def assert_no_secret_anywhere(folder: Path, *outputs: str) -> None:
    """Every file under `folder` (Hydra's .hydra records, logs, journal, mlflow.db, artifacts) and the output."""
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the password is in {path}"
    for text in outputs:
        assert SECRET not in text, text


# ------------------------------------------------------------------------------------------- one line, exit 2

def _bad_yaml(tmp: Path):
    path = write_sweep(tmp / "cfg", "broken", "# @package _global_\nsweep:\n  study_name: [unclosed\n  bad: : x\n")
    return "pitsearch", ["--config-dir", tmp / "cfg", "+sweep=broken"], f"{path}: line 4"


def _run_dir_under_a_file(tmp: Path):
    (tmp / "a_file").write_text("not a folder")
    return "pitsearch", [*FAST, f"hydra.run.dir={tmp / 'a_file' / 'run'}"], f"{tmp / 'a_file' / 'run'}: "


def _out_is_a_file(module: str):
    def setup(tmp: Path):
        journal_study(tmp, "s", trials=[(TrialState.COMPLETE, [0.5], "conv", 0)])
        (tmp / "F").write_text("a file")
        return module, ["s", "--out", tmp / "F"], f"--out: {tmp / 'F'}"
    return setup


def _users_own_rank1(tmp: Path):
    journal_study(tmp, "s", trials=[(TrialState.COMPLETE, [0.5], "conv", 0)])
    (tmp / "mine").mkdir()
    (tmp / "mine" / "rank1.yaml").write_text("my own notes\n")
    return "pitsearch.export", ["s", "--out", tmp / "mine"], f"{tmp / 'mine' / 'rank1.yaml'}: "


def _plain(*args: str, prefix: str):
    return lambda tmp: ("pitsearch", [*FAST, *args], prefix)


CASES = {
    "tracking uri scheme": _plain(f"tracking.uri=nonsense://u:{SECRET}@host/", prefix="tracking.uri: "),
    "seed not a number": _plain("train.seed=abc", prefix="train.seed: "),
    "unknown group option": _plain("model=nope", prefix="model: no option 'nope'"),
    "key typo": _plain("trian.epochs=1", prefix="trian.epochs: "),
    "unknown sweep": _plain("+sweep=does_not_exist", prefix="sweep: no option 'does_not_exist'"),
    "override syntax": _plain("train.epochs=[1", prefix="train.epochs=[1: "),
    "sweep file does not parse": _bad_yaml,
    "run folder not writable": _run_dir_under_a_file,
    "report --out is a file": _out_is_a_file("pitsearch.report"),
    "export --out is a file": _out_is_a_file("pitsearch.export"),
    "export over a user's file": _users_own_rank1,
    "adaptive seeds over a list": _plain("+sweep=pooling_ablation", "sweep.seeds={min: 3, max: 6}",
                                         prefix='sweep.seeds: a mapping cannot replace a list with `=`; delete the '
                                                'list first: "~sweep.seeds" "+sweep.seeds={min: 3, max: 6}"'),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, case):
    module, args, prefix = CASES[case](tmp_path)
    result = run_cli(args, cwd=tmp_path, module=module, timeout=120)
    assert_one_error_line(result, 2, prefix)
    assert not (tmp_path / "mlflow.db").exists()   # all caught before anything was tracked
    assert_no_secret_anywhere(tmp_path, result.stdout, result.stderr)   # .hydra records included


# In-process: each would cost a subprocess importing torch, to reach the same check.
@pytest.mark.parametrize("key, value", [("epochs", True), ("batch_size", True), ("threads", True), ("lr", True),
                                        ("seed", "abc"), ("seed", 1.5), ("seed", True), ("seed", 2**64)])
def test_train_config_takes_no_bool_for_a_number_and_an_integer_seed(key, value):
    from omegaconf import OmegaConf

    from pitsearch.paths import CONF_DIR
    from pitsearch.train import validate_train_config

    cfg = {**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "train" / "default.yaml")), key: value}
    with pytest.raises(ConfigError) as raised:
        validate_train_config(cfg)
    assert raised.value.field == f"train.{key}"


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "a\\b", "a b", "tab\tname", "new\nline"])
def test_a_study_name_must_be_a_plain_folder_name(name):
    from pitsearch.search.spec import parse_sweep

    with pytest.raises(ConfigError, match="plain folder name") as raised:
        parse_sweep({"study_name": name})
    assert raised.value.field == "sweep.study_name"


def test_export_overwrites_its_own_files_but_a_users_only_with_force(tmp_path):
    from pitsearch.export import HEADER, main

    journal_study(tmp_path, "s", trials=[(TrialState.COMPLETE, [0.5], "conv", 0)])
    storage = str(tmp_path / "pitsearch-sweeps/s/optuna-journal.log")
    out = tmp_path / "out"
    out.mkdir()
    (out / "rank1.yaml").write_text("my own notes\n")
    with pytest.raises(ConfigError, match="--force"):
        main(["s", "--storage", storage, "--out", str(out)])
    assert (out / "rank1.yaml").read_text() == "my own notes\n" and not (out / "model").exists()
    assert main(["s", "--storage", storage, "--out", str(out), "--force"]) == 0
    assert (out / "rank1.yaml").read_text().startswith(HEADER)
    assert main(["s", "--storage", storage, "--out", str(out)]) == 0   # its own export: rewritten freely


# ------------------------------------------------------------------------------- the handler and the printer

@pytest.mark.parametrize("error, status, line", [
    (ConfigError("train.lr", "must be > 0"), 2, "error: train.lr: must be > 0"),
    (ServiceUnavailable("MLflow tracking server", f"http://u:{SECRET}@h/", 1.0, "refused"), 3,
     "error: MLflow tracking server http://u:***@h/ unreachable for 1s (sweep.retry_timeout_s); last error: refused"),
    (NotADirectoryError(20, "Not a directory", "/x/f/run"), 2, "error: /x/f/run: Not a directory"),
    (KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
], ids=["config", "lost server", "path", "ctrl-c"])
def test_guarded_turns_a_known_failure_into_one_masked_line(capsys, error, status, line):
    from pitsearch.cli import guarded

    def fail():
        raise error

    assert guarded(fail) == status
    assert capsys.readouterr().err == line + "\n"


def test_guarded_prints_a_bug_as_a_masked_traceback(capsys):
    from pitsearch.cli import guarded

    def bug():
        raise RuntimeError(f"lost http://u:{SECRET}@host/ on the way")

    assert guarded(bug) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: lost http://u:***@host/ on the way" in err and SECRET not in err


def test_console_prints_brackets_verbatim_and_masks_passwords(capsys):
    from pitsearch.console import make_console

    line = ("trial    3 FAIL     data.root=/d  0.8s  [/tmp/x.png: cannot read image (bad)]  [bold]not bold[/bold] "
            "[red] model.depths=[1, 2, 1]")
    console = make_console()
    console.print(line)                         # before: rich.errors.MarkupError, the sweep died
    console.print(f"MLflow http://u:{SECRET}@host:5000")
    assert capsys.readouterr().err == f"{line}\nMLflow http://u:***@host:5000\n"


@pytest.mark.slow
def test_a_failure_reason_in_brackets_is_printed_and_the_sweep_goes_on(tmp_path):
    """An image folder with an undecodable file: that cell's reason starts with the file's path, which Rich read
    as a closing tag `[/...]` and crashed the sweep on; the other cell must still train."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for root in ("good", "bad"):
        for split, count in (("train", 4), ("val", 2)):
            for cls in ("a", "b"):
                folder = tmp_path / root / split / cls
                folder.mkdir(parents=True)
                for i in range(count):
                    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    broken = tmp_path / "bad" / "train" / "a" / "broken.png"
    broken.write_bytes(b"not a png")
    write_sweep(tmp_path / "cfg", "folders", f"""# @package _global_
defaults:
  - /sweep_base@sweep: default
  - override /data: imagefolder
data: {{root: {tmp_path / 'good'}, img_size: 8, aug: {{crop_padding: 0}}}}
model: {{patch_size: 2, stride: 1, depths: [1, 1, 1], heads: [1, 2, 4], head_dims: [8, 8, 8]}}
train: {{epochs: 1, progress: false, threads: 1, batch_size: 4}}
tracking: {{enabled: false}}
sweep:
  study_name: folders
  sampler: {{name: grid}}
  report: false
  space:
    data.root: {{choices: [{tmp_path / 'bad'}, {tmp_path / 'good'}]}}
""")
    result = run_cli(["--config-dir", tmp_path / "cfg", "+sweep=folders"], cwd=tmp_path, timeout=240)
    assert "Traceback" not in result.stderr and result.returncode in (0, 4), result.stderr   # 4: a cell failed
    assert f"  [{broken}: cannot read image (" in result.stderr
    assert any(" COMPLETE " in line and "good" in line for line in result.stderr.splitlines()), result.stderr


# ------------------------------------------------------------------------------------ Ctrl-C, lost servers

def _start(args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pitsearch", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})


def _interrupt_when(process: subprocess.Popen, marker: str) -> tuple[int, str]:
    """SIGINT (the terminal's Ctrl-C, to the process group) once `marker` is printed; (exit status, output)."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            break
    else:
        raise AssertionError(f"exited {process.wait()} before {marker!r}:\n{''.join(seen)}")
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=90)
    return process.returncode, "".join(seen) + rest


def test_ctrl_c_in_a_single_run_exits_130_with_one_line(tmp_path):
    """(Tracking off: that the interrupted run is closed as FAILED is run_experiment's, tested with sweeps.)"""
    process = _start([*TINY, "train.epochs=500", "train.progress=true", "tracking.enabled=false"], tmp_path)
    status, output = _interrupt_when(process, "epoch   0")
    assert status == 130, output
    assert output.rstrip().splitlines()[-1] == "interrupted (Ctrl-C)" and "Traceback" not in output


def test_a_sweep_that_lost_mlflow_is_one_masked_line_exit_3_and_no_file_holds_the_password(tmp_path):
    """A password in tracking.uri, the server gone for good (sweep.retry_timeout_s=0). (A single run with a
    password in tracking.uri is the table's first case.)"""
    config_dir = one_sweep(tmp_path / "cfg", "masked")
    result = run_cli(["--config-dir", config_dir, "+sweep=masked", f"tracking.uri=http://u:{SECRET}@127.0.0.1:9/",
                      "sweep.retry_timeout_s=0"], cwd=tmp_path, timeout=120)
    assert_one_error_line(result, 3, "MLflow tracking server http://u:***@127.0.0.1:9/ unreachable")
    assert list(tmp_path.glob("outputs/*/*/.hydra/overrides.yaml"))
    assert_no_secret_anywhere(tmp_path, result.stdout, result.stderr)


def test_multirun_masks_the_password_hydra_logs_and_records_with_escaped_colons(tmp_path):
    """With -m, Hydra's launcher logs `#0 : tracking.uri=http\\://u\\:<password>@...` before the job starts and
    records the same escaped form in multirun.yaml; neither may hold the password."""
    result = run_cli(["-m", f"tracking.uri=http://u:{SECRET}@127.0.0.1:9/", "train.epochs=0"], cwd=tmp_path,
                     timeout=120)
    assert result.returncode == 2, result.stderr
    assert "train.epochs" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.glob("multirun/*/*/multirun.yaml"))
    assert_no_secret_anywhere(tmp_path, result.stdout, result.stderr)
