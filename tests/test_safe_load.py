"""No script runs code hidden in a checkpoint, and a checkpoint of another architecture ends in one
clear line: every script that takes ``checkpoint=`` is run as a user runs it."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import module_dir
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moco.checkpoint import query_encoder, read_checkpoint, read_moco_checkpoint
from moco.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
EVAL_SCRIPTS = ("knn_eval", "linear_probe", "compare_optimizers")
SCRIPTS = (*EVAL_SCRIPTS, "export")
# Small synthetic data, in case a script got as far as reading data (it must not).
DATA = ["data=synthetic", "data.num_train=20", "data.num_test=10", "features.progress=false"]
FROM_PRETRAIN = "use a checkpoint as scripts/pretrain.py wrote it"


class Payload:
    """Pickles as a call to ``Path.touch(marker)``: whoever unpickles it creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def tiny_moco():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "pretrain",
            ["data=synthetic", "data.image_size=16", "model.queue_size=64", "model.dim=16"],
        )
    return instantiate(cfg.model)


def write_malicious(path: Path, marker: Path, moco) -> Path:
    """A checkpoint that looks like a MoCo one (real hyper-parameters and query weights) and
    carries the payload among its Lightning entries, the way a tampered download would."""
    state = {k: v for k, v in moco.state_dict().items() if k.startswith("encoder_q.head")}
    torch.save(
        {"hyper_parameters": dict(moco.hparams), "state_dict": state, "loops": Payload(marker)},
        path,
    )
    return path


def write_resnet50_as_resnet18(path: Path, moco) -> Path:
    """resnet50 backbone weights under hyper-parameters that say resnet18: the files of two runs
    mixed up. Zeros, because only names and shapes matter here."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.resnet50().state_dict().items()}
    state = {f"encoder_q.backbone.{k}": torch.zeros(s) for k, s in shapes.items() if "fc." not in k}
    state.update({k: v for k, v in moco.state_dict().items() if k.startswith("encoder_q.head")})
    torch.save({"hyper_parameters": dict(moco.hparams), "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    with module_dir(tmp_path_factory, "files") as tmp:
        yield _files(tmp)


def _files(tmp):
    moco = tiny_moco()
    return {
        "marker": tmp / "payload_ran",
        "malicious": write_malicious(tmp / "malicious.ckpt", tmp / "payload_ran", moco),
        "resnet50": write_resnet50_as_resnet18(tmp / "resnet50.ckpt", moco),
        "moco": moco,
        "tmp": tmp,
    }


# (script, file) pairs run by the CLI. All three eval scripts share one loader; the mix-up is
# shown through one of them and the export, the pickle on every script, as the issue asks.
RUNS = [(s, "malicious") for s in SCRIPTS] + [("knn_eval", "resnet50"), ("export", "resnet50")]


@pytest.fixture(scope="module")
def runs(files):
    """Every run of RUNS, started at once (each is mostly interpreter start-up; in parallel
    they take the time of about two), then waited for."""
    started = {}
    for script, name in RUNS:
        run_dir = files["tmp"] / f"run_{script}_{name}"
        extra = [] if script == "export" else DATA
        started[script, name] = (
            run_dir,
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "scripts" / f"{script}.py"),
                    f"checkpoint={files[name]}",
                    *extra,
                    f"hydra.run.dir={run_dir}",
                ],
                cwd=ROOT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    results = {}
    try:
        for key, (run_dir, proc) in started.items():
            _, stderr = proc.communicate(timeout=600)
            results[key] = run_dir, proc.returncode, stderr
    finally:  # a hung run must not outlive the test session
        for _, proc in started.values():
            if proc.poll() is None:
                proc.kill()
    return results


def test_the_payload_is_live(files, tmp_path):
    """The malicious file is a real threat: a plain torch.load does run its code."""
    marker = tmp_path / "ran"
    evil = write_malicious(tmp_path / "evil.ckpt", marker, files["moco"])
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.slow  # the shared fixture starts six interpreters (~20 s on 2 cores)
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_a_checkpoint_whose_pickle_runs_code(runs, files, script):
    run_dir, code, stderr = runs[script, "malicious"]
    assert code == 2, stderr[-3000:]
    assert stderr == (
        f"error: {files['malicious']} was refused: reading it would execute code (getattr), "
        f"not just load tensors; {FROM_PRETRAIN}\n"
    )
    assert not files["marker"].exists()
    assert not run_dir.exists()  # nothing half-written


@pytest.mark.slow  # the shared fixture starts six interpreters (~20 s on 2 cores)
@pytest.mark.parametrize("script", ["knn_eval", "export"])
def test_another_architectures_weights_end_in_one_line(runs, files, script):
    run_dir, code, stderr = runs[script, "resnet50"]
    assert code == 2, stderr[-3000:]
    assert stderr == (
        f"error: {files['resnet50']} holds resnet50 weights but its hyper-parameters say "
        f"backbone=resnet18: the file was edited or mixed up; {FROM_PRETRAIN}\n"
    )
    assert not run_dir.exists()


def test_weights_of_another_shape_name_the_first_mismatch(files, tmp_path):
    # The small-stem weights of a 16 px run, with hyper-parameters edited to 224 px.
    moco = files["moco"]
    path = tmp_path / "edited.ckpt"
    torch.save(
        {
            "hyper_parameters": {**dict(moco.hparams), "image_size": 224},
            "state_dict": moco.state_dict(),
        },
        path,
    )
    with pytest.raises(DataError) as error:
        query_encoder(read_moco_checkpoint(path), path)
    assert str(error.value) == (
        f"{path}: the encoder_q weights do not fit the resnet18 encoder its hyper-parameters "
        "describe (1 of another shape, first backbone.conv1.weight: 64x3x3x3 in the file, "
        f"64x3x7x7 expected); {FROM_PRETRAIN}"
    )


def test_the_loader_names_the_option_for_reuse_by_resume(tmp_path):
    with pytest.raises(ConfigError, match=r"^resume=.*missing.ckpt does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt", option="resume")


def _loads_a_checkpoint(call: ast.Call) -> bool:
    """torch.load(...), X.load_from_checkpoint(...) or a Lightning fit/validate(ckpt_path=...)."""
    func = call.func
    if not isinstance(func, ast.Attribute):
        return False
    torch_load = (
        func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id == "torch"
    )
    return (
        torch_load
        or func.attr == "load_from_checkpoint"
        or any(k.arg == "ckpt_path" for k in call.keywords)
    )


def test_every_load_in_the_code_is_weights_only():
    """A guard for code written later: each checkpoint load in moco/ and scripts/ says
    weights_only=True (Lightning's own default would be torch's, which an environment variable
    can turn off)."""
    offenders = []
    for path in [*ROOT.glob("moco/**/*.py"), *ROOT.glob("scripts/*.py")]:
        for call in ast.walk(ast.parse(path.read_text())):
            if isinstance(call, ast.Call) and _loads_a_checkpoint(call):
                safe = {k.arg: k.value for k in call.keywords}.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert offenders == []
