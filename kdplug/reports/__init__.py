"""Reports and figures the engines write: ``label.py`` (the label run's report.json and
report.png) and ``figures.py`` (matplotlib set-up shared by every figure)."""
