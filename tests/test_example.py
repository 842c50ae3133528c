"""The end-to-end example ``python -m anomalib_mvfa``."""

from __future__ import annotations

import re

from anomalib_mvfa.__main__ import main


def test_example_runs_end_to_end_on_tiny_random_backbone(tiny_config, capsys) -> None:
    code = main(["--backbone", str(tiny_config), "--pretrained", "none", "--image-size", "64", "--epochs", "2"])
    output = capsys.readouterr().out
    assert code == 0
    assert len(re.findall(r"^epoch \d/2: segmentation loss \d+\.\d+, detection loss \d+\.\d+$", output, re.M)) == 2
    assert len(re.findall(r"^\s+\d+\s+(normal|abnormal)\s", output, re.M)) == 8
    assert re.search(r"image AUROC on 8 generated test crops: \d\.\d{3} \(RANDOM CLIP weights: meaningless\)", output)


def test_example_offline_default_fails_with_instructions(capsys) -> None:
    code = main([])
    error = capsys.readouterr().err
    assert code == 2
    assert "'openai'" in error
    assert "pretrained=" in error
