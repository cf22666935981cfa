#!/usr/bin/env bash
# Rebuild this folder from nothing (2 CPU cores: about 25 min). Run from the project root with the
# shared datasets beside it (../shared/datasets). The rows:
#   1. the recipe itself: grouped split, masked, double + scratch, 2 trials, best params x 3 seeds;
#   2. per backbone, the same double-transfer model with ONE setting changed (image-level split,
#      acquisition-blocks split, annotation mask off), trained once with the best parameters of (1),
#      so each paired comparison isolates that setting (no tuning draw in between);
#   3. the fuzzy head on the models of (1); then the report over all rows and the promotion.
# (The committed run gave the variants' empty search space as a /tmp copy of
# experiments/search_space_none.yaml; provenance.json shows that path.)
set -euo pipefail
dtl main --config real-cpu-tiny
python - <<'PY'
import subprocess
from dtl.tracking import connect, find_runs

t = connect("", "all-dtl-real-cpu-tiny")
best = {}
for r in find_runs(t, "tags.`dtl.role` = 'study' and tags.phase = 'phase2' and tags.strategy = 'double' "
                      "and tags.split_protocol = 'near-duplicate-groups' and tags.annotation_mask = 'on'"):
    best[r.data.tags["backbone"]] = {k[5:]: v for k, v in r.data.tags.items() if k.startswith("best.")}
for extra in ("phase2.data.protocol=image-level", "phase2.data.protocol=acquisition-blocks",
              "phase2.data.mask_annotation=off"):
    for b, params in sorted(best.items()):
        cmd = ["dtl", "main", "--config", "real-cpu-tiny", "--backbones", b, "-o", "strategies=[double]",
               "-o", "final.repeats=1", "-o", "phase2.n_trials=1", "-o", "tune.search_space=search_space_none.yaml",
               "-o", "report_dir=outputs/report-variant", "--quiet", "-o", extra]
        subprocess.run(cmd + [x for k, v in params.items() for x in ("-o", f"phase2.{k}={v}")], check=True)
PY
dtl fuzzy --config real-cpu-tiny
dtl promote --config real-cpu-tiny
dtl report --config real-cpu-tiny
# Explain and stress the champion (Grad-CAM + shortcut score, occlusion, cross-variant, corruptions,
# calibration; the fitted temperature is stored with the champion only when its logged model can apply
# it: v11 was logged before that option, so it is reported, not stored), then the
# double-transfer test_efficientnet trained WITHOUT the annotation mask (v20) for the shortcut
# comparison; writes reports/aria-cpu-tiny/explain/<model>/ and logs under each study run.
dtl explain --config real-cpu-tiny
dtl explain --config real-cpu-tiny --model models:/all-dtl-real-cpu-tiny/20
dtl report --config real-cpu-tiny
