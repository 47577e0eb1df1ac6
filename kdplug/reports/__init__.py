"""Reports and figures the engines write: ``label.py`` (the label run's report.json and
report.png), ``teachers.py`` (``teachers report``'s running sums and figures) and
``figures.py`` (matplotlib set-up and ``per_class_panel``, shared by every figure)."""
