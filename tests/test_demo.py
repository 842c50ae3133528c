"""The README's main command: ``anomalib-mvfa demo``."""

from __future__ import annotations

import re

from anomalib_mvfa.commands import main


def test_demo_runs_end_to_end_with_tiny_random_backbone(tmp_path, capsys) -> None:
    code = main([
        "demo", "--backbone", "tiny-random", "--epochs", "2", "--k-shot", "2",
        "--root", str(tmp_path / "data"), "--results", str(tmp_path / "results"),
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert code == 0
    assert sorted(p.parent.name for p in (tmp_path / "data" / "histology").rglob("*.png")) == sorted(
        ["good"] * 16 + ["good"] * 12 + ["defect"] * 12 + ["defect"] * 12
    )
    rows = re.findall(r"^(image_AUROC|image_F1Score|pixel_AUROC|pixel_F1Score)\s+\d\.\d{3}\s+\((.*)\)$", output, re.M)
    assert sorted(name for name, _ in rows) == ["image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"]
    assert all("RANDOM CLIP weights" in note for _, note in rows)
    visualisations = re.search(r"^visualisations: (.+)$", output, re.M).group(1)
    assert len(list((tmp_path / "results").rglob("images/**/*.png"))) > 0
    assert visualisations.startswith(str(tmp_path / "results"))


def test_demo_offline_with_default_weights_fails_fast(tmp_path, capsys) -> None:
    code = main(["demo", "--root", str(tmp_path / "data"), "--results", str(tmp_path / "results")])
    output = capsys.readouterr().err  # errors go to stderr, as in the other commands
    assert code == 2
    assert "'openai'" in output
    assert "--pretrained /path/to/weights.pt" in output
    assert not (tmp_path / "data").exists()  # nothing written before the failure
