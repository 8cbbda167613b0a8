#!/usr/bin/env bash
# A whole federation on one machine: three synthetic hospitals, FFE, two rounds.
# Each party runs as its own process and they share only the bucket folder.
set -euo pipefail
WORK=${1:-/tmp/fedfs-sim}
export nnUNet_raw=$WORK/nnUNet_raw nnUNet_preprocessed=$WORK/nnUNet_preprocessed nnUNet_results=$WORK/nnUNet_results
python - <<PY
from fedfs import make_federation
for s in make_federation("$WORK/nnUNet_raw", n_sites=3, base_id=501, test_root="$WORK/heldout"):
    print(s.dataset_name, s.n_train, "training cases")
PY
fedfs simulate --dir "$WORK/federation" --site SiteA=501 --site SiteB=502 --site SiteC=503 \
    --mode ffe --rounds 2 -tr nnUNetTrainerFedfsTiny
fedfs status "$WORK/federation/bucket"
