#!/usr/bin/env bash
# WMT14 En-De KD recipe (several GPUs): transformer-big teacher, distilled corpora, a student per
# method (one after another, each on all GPUs), pruning, export, evaluation, and the
# results page $WORK/results.md with its plots.
#
#   recipes/wmt14_en_de/run.sh                 # everything; a rerun skips finished steps
#   recipes/wmt14_en_de/run.sh evaluate report # only these steps
#   DRY_RUN=1 recipes/wmt14_en_de/run.sh       # print the commands
#   DATA_SOURCE=bible TRAIN_LINES=2000 GPUS=cpu ... # no download: a Bible slice (tests)
#
# Settings: recipes/wmt14_en_de/config.sh (each can be set from the environment).
set -euo pipefail
source "$(dirname "$0")/config.sh"
source "$REPO/recipes/common/pipeline.sh"
run_pipeline "$@"
