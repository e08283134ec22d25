#!/usr/bin/env bash
# KD study on any parallel corpus: teacher, distilled corpora, a student per
# method, pruning, export, evaluation, and the results page $WORK/results.md.
#
#   DATA_DIR=~/corpus SRC=de TGT=en recipes/custom/run.sh            # everything (GPU profile)
#   DATA_DIR=~/corpus SRC=de TGT=en PROFILE=cpu recipes/custom/run.sh
#   DATA_DIR=... SRC=... TGT=... recipes/custom/run.sh evaluate report   # only these steps
#   DRY_RUN=1 DATA_DIR=... SRC=... TGT=... recipes/custom/run.sh      # print the commands
#
# Settings: recipes/custom/config.sh and recipes/common/settings.sh.
set -euo pipefail
source "$(dirname "$0")/config.sh"
source "$REPO/recipes/common/pipeline.sh"
run_pipeline "$@"
