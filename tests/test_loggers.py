"""The logger group: CSV always first, TensorBoard, W&B and MLflow on request, a missing package
refused in one line, and a resumed run continuing the same tracker runs. No network: W&B runs
offline and MLflow writes a SQLite store in the run directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN, compose_config
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from moco.errors import ConfigError
from moco.run.check import check_pretrain
from moco.run.cli import exit_on_user_error
from moco.run.loggers import RUNS_FILE, RunRecord, chosen, make_loggers
from moco.run.train import pretrain

REPO = Path(__file__).resolve().parents[1]
RUN = list(TINY_RUN)
OFFLINE = "logger.wandb.mode=offline"


@pytest.fixture(autouse=True)
def no_tracker_env(monkeypatch):
    """A developer's own tracker settings must not leak into the composed configs."""
    for name in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)


def _types(loggers) -> list[type]:
    return [type(logger) for logger in loggers]


# --------------------------------------------------------------------------- composition
def test_the_default_is_the_csv_log_alone(tmp_path):
    cfg = compose_config()
    assert chosen(cfg.logger) == []
    loggers = make_loggers(cfg, tmp_path, resuming=False)
    assert _types(loggers) == [CSVLogger]
    assert Path(loggers[0].log_dir) == tmp_path / "logs"  # logs/metrics.csv
    assert chosen(compose_config(["logger=csv"]).logger) == []


@pytest.mark.parametrize(
    "choice, trackers",
    [
        ("logger=[csv,wandb]", [WandbLogger]),
        ("logger=wandb", [WandbLogger]),  # CSV is on whatever logger= says
        ("logger=[tensorboard,wandb]", [TensorBoardLogger, WandbLogger]),
        ("logger=[csv,tensorboard]", [TensorBoardLogger]),
    ],
)
def test_chosen_trackers_come_after_the_csv_log(tmp_path, choice, trackers):
    cfg = compose_config([choice, OFFLINE] if "wandb" in choice else [choice])
    check_pretrain(cfg)
    loggers = make_loggers(cfg, tmp_path, resuming=False)
    assert _types(loggers)[0] is CSVLogger
    assert all(isinstance(lg, kind) for lg, kind in zip(loggers[1:], trackers, strict=True))


def test_all_four_compose_and_each_keeps_its_own_settings():
    cfg = compose_config(
        [
            "logger=[csv,tensorboard,wandb,mlflow]",
            "logger.wandb.project=p",
            "logger.wandb.tags=[a,b]",
            "logger.mlflow.experiment_name=e",
        ]
    )
    check_pretrain(cfg)
    assert chosen(cfg.logger) == ["tensorboard", "wandb", "mlflow"]
    assert (cfg.logger.wandb.project, list(cfg.logger.wandb.tags)) == ("p", ["a", "b"])
    assert str(cfg.logger.wandb.mode) == "online"
    assert cfg.logger.mlflow.experiment_name == "e" and cfg.logger.mlflow.tracking_uri is None


def test_the_tracker_environment_variables_are_the_defaults(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    cfg = compose_config(["logger=[wandb,mlflow]"])
    assert str(cfg.logger.wandb.mode) == "offline"
    assert cfg.logger.mlflow.tracking_uri == "http://127.0.0.1:5000"
    # The command line still wins.
    cfg = compose_config(["logger=wandb", "logger.wandb.mode=disabled"])
    assert str(cfg.logger.wandb.mode) == "disabled"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["logger=[csv,wandb]", "+logger.wandb.projekt=x"], "logger.wandb.projekt is not a key"),
        (["+logger.neptune=1"], "logger.neptune is not a key"),
        (["logger=mlflow", "+logger.mlflow.uri=x"], "logger.mlflow.uri is not a key"),
    ],
)
def test_a_misspelt_logger_key_is_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_pretrain(compose_config(overrides))


def test_an_unknown_option_or_mode_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="logger=neptune is unknown: use one of csv, mlflow"):
        compose_config(["logger=neptune"])
    with pytest.raises(ConfigError, match="logger.wandb.mode=dryrun is unknown: use one of"):
        compose_config(["logger=wandb", "logger.wandb.mode=dryrun"])


def test_only_the_process_that_becomes_rank_zero_builds_trackers(tmp_path, monkeypatch):
    cfg = compose_config(["logger=[tensorboard,wandb]", OFFLINE])
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert _types(make_loggers(cfg, tmp_path, resuming=False)) == [CSVLogger]
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.setenv("NODE_RANK", "1")  # local rank 0 of another node
    assert _types(make_loggers(cfg, tmp_path, resuming=False)) == [CSVLogger]


# ------------------------------------------------------------------------- missing package
@pytest.mark.parametrize(
    "choice, blocked, message",
    [
        ("logger=[csv,wandb]", "wandb", "logger=wandb needs the wandb package: "),
        ("logger=tensorboard", "tensorboard", "logger=tensorboard needs the tensorboard package"),
        ("logger=mlflow", "mlflow", "logger=mlflow needs the mlflow package"),
        ("logger=mlflow", "sqlalchemy", "logger=mlflow needs the sqlalchemy package"),
    ],
)
def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys, choice, blocked, message
):
    monkeypatch.setitem(sys.modules, blocked, None)  # `import <blocked>` fails from here on
    backend = choice.strip("]").rsplit(",", 1)[-1].split("=")[-1]
    run_dir = tmp_path / "run"
    task = exit_on_user_error(lambda cfg: pretrain(cfg, run_dir))
    with pytest.raises(SystemExit) as exit_info:
        task(compose_config([*RUN, choice]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert err[0].endswith(f"pip install -e '.[{backend}]'")
    assert not run_dir.exists()


def test_a_tracking_server_needs_no_local_database(monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    check_pretrain(compose_config(["logger=mlflow", "logger.mlflow.tracking_uri=http://h:5000"]))


def test_the_script_says_so_in_one_line_and_exits_2(tmp_path):
    """The real entry point, with W&B blocked in its process."""
    code = (
        "import runpy, sys; sys.modules['wandb'] = None; "
        f"sys.argv = ['pretrain.py', 'hydra.run.dir=run', *{RUN!r}, 'logger=wandb']; "
        f"runpy.run_path({str(REPO / 'scripts' / 'pretrain.py')!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        "error: logger=wandb needs the wandb package: pip install -e '.[wandb]'"
    ]
    assert list(tmp_path.iterdir()) == []  # no run directory left behind


# --------------------------------------------------------------------------- run ids kept
def test_a_noted_run_is_continued_only_by_a_resuming_start_of_the_same_project(tmp_path):
    RunRecord(tmp_path, "wandb", {"project": "moco", "entity": None}).save("abc123")
    cfg = compose_config(["logger=wandb", OFFLINE])
    assert make_loggers(cfg, tmp_path, resuming=True)[1].version == "abc123"
    assert make_loggers(cfg, tmp_path, resuming=False)[1].version is None  # a fresh start
    other = compose_config(["logger=wandb", OFFLINE, "logger.wandb.project=other"])
    assert make_loggers(other, tmp_path, resuming=True)[1].version is None
    (tmp_path / RUNS_FILE).write_text("{not json")  # a damaged file: new runs, no crash
    assert make_loggers(cfg, tmp_path, resuming=True)[1].version is None


def _tracker_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    wandb_home = tmp_path / "wandb_home"  # W&B's settings and caches, not the user's
    return {
        **env,
        "OMP_NUM_THREADS": "1",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(wandb_home),
        "WANDB_CONFIG_DIR": str(wandb_home / "config"),
        "WANDB_CACHE_DIR": str(wandb_home / "cache"),
        "WANDB_DATA_DIR": str(wandb_home / "data"),
    }


def _pretrain(run_dir: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/pretrain.py", f"hydra.run.dir={run_dir}", *RUN, *extra]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _noted_ids(run_dir: Path) -> dict:
    entries = json.loads((run_dir / RUNS_FILE).read_text())
    return {backend: entry["id"] for backend, entry in entries.items()}


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path):
    run_dir, env = tmp_path / "run", _tracker_env(tmp_path)
    trackers = ["logger=[csv,tensorboard,wandb,mlflow]", OFFLINE]
    _pretrain(run_dir, env, *trackers, "trainer.max_epochs=1")
    first = _noted_ids(run_dir)
    assert first.keys() == {"wandb", "mlflow"}
    # Resumed for a second epoch, with a changed learning rate (allowed, warned of).
    second = _pretrain(run_dir, env, *trackers, "trainer.max_epochs=2", "optimizer.lr=0.06")
    assert "Resuming from" in second.stdout
    assert _noted_ids(run_dir) == first

    # W&B: both starts wrote to the run of the noted id (offline, one folder per start).
    starts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [s.name.rsplit("-", 1)[1] for s in starts] == [first["wandb"]] * 2
    log = (starts[1] / f"run-{first['wandb']}.wandb").read_bytes()
    assert b"train/loss_epoch" in log  # the second start logged its epoch there

    # MLflow: one run in the run directory's store, holding both epochs.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(first["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert len(client.search_runs([run.info.experiment_id])) == 1
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss_epoch")]
    assert len(epochs) == 2
    logged_epochs = {m.value for m in client.get_metric_history(run.info.run_id, "epoch")}
    assert logged_epochs == {0.0, 1.0}
    assert run.data.params["optimizer/lr"] == "0.03"  # the continued run keeps its first values

    # TensorBoard: the same folder, an event file per start, both epochs readable together.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs"))
    events.Reload()
    assert len(list((run_dir / "logs").glob("events.out.tfevents.*"))) == 2
    assert len(events.Scalars("train/loss_epoch")) == 2
