"""The stage graph's names and fixed outputs (under the artifacts dir). No heavy imports: the flow checks
dvc.yaml against them before anything loads torch; pruneflow.pipeline.stages implements them."""

STAGES = ("source", "calibrate", "score", "prune", "recover", "evaluate", "export")
OUTPUTS = {"source": "source.json", "calibrate": "calibration", "score": "scores", "prune": "model",
           "recover": "recovered", "evaluate": "metrics.json", "export": "export"}
REPORT = "report"  # the evaluate stage's second output: report.md, plots, lm_eval.json, the local task files
RESOURCES = "resources"  # every stage's seconds and peak memory: resources/<stage>.json (DVC metrics, not deps)
