"""What importing the package costs and gives."""

import subprocess
import sys

import moco


def test_the_parts_that_do_not_train_load_without_lightning():
    code = (
        "import sys, moco.optim, moco.eval.results\n"
        "print(sorted(m for m in ('pytorch_lightning', 'lightning_fabric') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_lightning_module_is_still_moco_dot_moco():
    from moco.model import MoCo

    assert moco.MoCo is MoCo  # the configs' _target_
    assert "MoCo" in moco.__all__
    try:
        moco.NoSuchThing  # noqa: B018
    except AttributeError as error:
        assert "NoSuchThing" in str(error)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")
