"""The engines: one module per command, named as the command is.

| command | engine | entry point |
|---|---|---|
| ``kdplug label`` | ``label.py`` | ``run_label(LabelConfig)`` |
| ``kdplug distill`` | ``distill.py`` | ``distill(DistillConfig)`` |
| ``kdplug cache`` | ``cache.py`` | ``run_cache(CacheConfig)`` |
| ``kdplug teachers report`` / ``calibrate`` | ``teachers.py`` | ``report``, ``calibrate`` |
| ``kdplug self-train`` | ``self_train.py`` | ``self_train(SelfTrainConfig)`` |
| ``kdplug eval`` | ``eval.py`` | ``evaluate_student`` |
| ``kdplug demo`` | ``demo.py`` | ``run_demo`` |

The click commands in ``kdplug/cli/`` are thin wrappers over these; the engines share the
data path (``kdplug.data``), the teacher set (``kdplug.teachers``) and the run directories
(``kdplug.outputs``), and write their reports through ``kdplug.reports``.
"""
