"""pfl._torchvision: torchvision imports and builds models on both CPU and CUDA builds of torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pfl._torchvision import import_torchvision


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_torchvision_builds_resnet18():
    tv = import_torchvision()
    assert tv.__name__ == "torchvision"
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_import_torchvision_is_idempotent():
    assert import_torchvision() is import_torchvision()


def test_plain_import_fails_on_cpu_torch():
    proc = _run("import torchvision")
    if proc.returncode == 0:
        pytest.skip("plain `import torchvision` works here (torchvision's extension loads, e.g. CUDA torch)")
    assert "does not exist" in proc.stderr
    assert "torchvision::" in proc.stderr


def test_import_via_shim_succeeds_in_fresh_process():
    proc = _run(
        "from pfl._torchvision import import_torchvision\n"
        "tv = import_torchvision()\n"
        "import torchvision, torch\n"
        "assert torchvision is tv\n"
        "m = tv.models.resnet18(num_classes=10).eval()\n"
        "print(tuple(m(torch.zeros(2, 3, 32, 32)).shape))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(2, 10)"
