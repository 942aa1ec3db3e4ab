"""The notebooks execute end to end (nbclient, small-size flag) and their key numbers are in range.

The kernel is this interpreter (the venv's python), registered under a private kernelspec by
ipykernel's own installer in a temporary prefix, so the test works from a clean clone whatever
kernels the user has installed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import nbformat
import pytest
from datagen import write_mnist
from nbclient import NotebookClient

#: Each notebook runs end to end.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
KERNEL = "fastclip-test-venv"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec named KERNEL that starts ``sys.executable -m ipykernel_launcher``, found
    through JUPYTER_PATH (restored afterwards)."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name=KERNEL, prefix=str(prefix))
    spec = json.loads((prefix / "share/jupyter/kernels" / KERNEL / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(prefix / "share/jupyter"), old) if p)
    yield KERNEL
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def execute(path: Path, env: dict[str, str], kernel_name: str, timeout: int = 900) -> nbformat.NotebookNode:
    """Run every cell of ``path`` in a fresh kernel started with ``env`` added to the environment,
    with notebooks/ as the working directory; returns the executed notebook."""
    nb = nbformat.read(path, as_version=4)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel process inherits os.environ at launch
    try:
        NotebookClient(
            nb, kernel_name=kernel_name, timeout=timeout, resources={"metadata": {"path": str(NOTEBOOKS)}}
        ).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def stdout_of(nb: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("name") == "stdout"
    )


def results_of(nb: nbformat.NotebookNode) -> dict:
    """The ``RESULTS_JSON {...}`` line the notebook prints last."""
    lines = [line for line in stdout_of(nb).splitlines() if line.startswith("RESULTS_JSON ")]
    assert len(lines) == 1, "the notebook must print one RESULTS_JSON line"
    return json.loads(lines[0][len("RESULTS_JSON ") :])


def png_outputs(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )


@pytest.mark.parametrize("name", ["how_to_use.ipynb", "simple_conv_results.ipynb"])
def test_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.timeout(900)
def test_how_to_use(kernel, tmp_path):
    """The tutorial on the real Fashion-MNIST (its offline default), small size: clipping holds
    on the exact norms after the final clip, accuracies are sane, the TensorBoard curves exist."""
    nb = execute(
        NOTEBOOKS / "how_to_use.ipynb",
        {"FASTCLIP_NB_SMALL": "1", "FASTCLIP_NB_OUT": str(tmp_path / "runs"), "DATASET": "fashion-mnist"},
        kernel,
    )
    r = results_of(nb)
    assert (r["dataset"], r["small"], r["clip"]) == ("fashion-mnist", True, 1.0)
    for model in ("ConvModel", "ConvModel_v2"):
        # 512 images, one epoch: well above chance (10 %), below perfect
        assert 30 < r["test_acc"][model] < 100
        assert 30 < r["test_acc_final"][model] < 100
        final, trained = r["exact_sigma1_final"][model], r["exact_sigma1"][model]
        assert all(math.isfinite(v) and v > 0 for v in [*final.values(), *trained.values()])
        for layer in r["clipped"][model]:
            assert final[layer] <= 1.05 * r["clip"], (model, layer, final[layer])
    assert sorted(r["clipped"]["ConvModel"]) == ["conv1", "fc1"]
    assert sorted(r["clipped"]["ConvModel_v2"]) == ["conv1", "conv1_.sub_conv1", "fc1"]
    # the composition is what ConvModel_v2 clips; the free BN is the layer allowed to be large
    assert r["exact_sigma1_final"]["ConvModel_v2"]["conv1"] <= 1.05
    assert r["exact_sigma1_final"]["ConvModel"]["conv1 -> bn1"] > 1.05
    assert r["lsv_tags"]["ConvModel"] == ["train/lsv_bn1", "train/lsv_conv1", "train/lsv_fc1"]
    assert r["lsv_tags"]["ConvModel_v2"] == [
        "train/lsv__bn",
        "train/lsv__concat",
        "train/lsv__conv",
        "train/lsv_fc1",
    ]
    assert png_outputs(nb) >= 2  # the two inline TensorBoard plots
    assert any((tmp_path / "runs" / "conv_model").glob("events.out.tfevents.*"))


@pytest.mark.timeout(900)
def test_simple_conv_results(kernel, tmp_path):
    """The pipeline notebook on tiny generated MNIST (DATASET=mnist + FASTCLIP_DATA_DIR), small
    size: the table has a row per method with accuracies in range, the layer norms and the
    figures exist, and the CSVs it reads are the pipeline's."""
    import pandas as pd

    data = write_mnist(tmp_path / "data", n_train=256, n_test=64, seed=0)
    nb = execute(
        NOTEBOOKS / "simple_conv_results.ipynb",
        {
            "FASTCLIP_NB_SMALL": "1",
            "DATASET": "mnist",
            "FASTCLIP_DATA_DIR": str(data),
            "FASTCLIP_NB_LOGDIR": str(tmp_path / "logs"),
        },
        kernel,
    )
    r = results_of(nb)
    parent = tmp_path / "logs" / "mnist" / "SimpleConv_models"
    assert (r["small"], r["dataset"], r["parent"]) == (True, "mnist", str(parent))
    assert sorted((row["mode"], row["method"]) for row in r["rows"]) == [
        ("wBN", "fastclip"),
        ("wBN", "miyato"),
    ]
    assert sorted((row["method"], row["eps"]) for row in r["table"]) == [
        ("fastclip", 0.02),
        ("fastclip", 0.05),
        ("miyato", 0.02),
        ("miyato", 0.05),
    ]
    for row in r["table"]:
        assert row["n_seeds"] == 2
        assert 0 <= row["adv_acc_mean"] <= row["clean_acc_mean"] <= 100
        assert row["clean_acc_mean"] > 20  # the generated classes are learnable in one epoch
    # the notebook's numbers are the means of the per-run CSVs the attacks wrote
    runs = pd.read_csv(parent / "attack_results_runs.csv")
    for row in r["table"]:
        sel = runs[
            (runs["method"] == row["method"]) & (runs["attack"] == "pgd") & (runs["eps"] == row["eps"])
        ]
        assert len(sel) == 2 and sel["adv_acc"].mean() == pytest.approx(row["adv_acc_mean"])
    # certified L2 accuracy at each radius, never above the clean accuracy, falling with eps
    cert = {(c["method"], round(c["eps"], 6)): c for c in r["certified"]}
    assert sorted(cert) == [("fastclip", 0.05), ("fastclip", 0.1), ("miyato", 0.05), ("miyato", 0.1)]
    for (method, _), c in cert.items():
        assert c["n_seeds"] == 2 and 0 <= c["adv_acc_mean"] <= c["clean_acc_mean"] <= 100
        assert cert[(method, 0.1)]["adv_acc_mean"] <= cert[(method, 0.05)]["adv_acc_mean"]
    for row in r["rows"]:  # the network bound shown is the mean of the runs' measured L
        sel = runs[(runs["method"] == row["method"]) & (runs["attack"] == "certify")]
        assert (
            row["L"] == pytest.approx(sel.groupby("seed")["lipschitz"].first().mean(), abs=1e-3)
            and row["L"] > 0
        )
    norms = {(n["method"], n["layer"]): n for n in r["layer_norms"]}
    assert set(norms) == {
        (m, layer) for m in ("fastclip", "miyato") for layer in ("conv1", "conv1.conv", "fc1")
    }
    for layer in ("conv1.conv", "fc1"):  # FastClip's clipped layers, measured exactly after training
        assert norms[("fastclip", layer)]["sigma1_mean"] <= 1.05 * norms[("fastclip", layer)]["clip"]
    assert norms[("miyato", "conv1.conv")]["sigma1_mean"] > 1.05  # the reshaped-kernel norm is not the conv's
    for fig in r["figures"]:
        assert Path(fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [Path(f).name for f in r["figures"]] == ["layer_norms.png", "curves_wBN.png"]
    assert png_outputs(nb) == 2
    assert all(
        (parent / f"method_{m}_wBN_{s}" / "DONE").exists() for m in ("fastclip", "miyato") for s in (1, 2)
    )
