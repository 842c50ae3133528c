"""What an evaluation or benchmark run leaves for people to look at.

- per-image results (one CSV row per test image, with the saved anomaly map's path);
- ROC and precision-recall curves per category, as PNG and as the points behind them;
- one self-contained HTML report page with the tables, the curves and a gallery of mistakes.
"""
