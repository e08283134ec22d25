#!/usr/bin/env bash
# Bible es-en KD study on one GPU: teacher, distilled corpora, a student per
# method (in parallel on the GPU), pruning, export, evaluation, and the
# results page docs/results.md with its plots.
#
#   recipes/bible_es_en/run.sh                 # everything; a rerun skips finished steps
#   recipes/bible_es_en/run.sh evaluate report # only these steps
#   DRY_RUN=1 recipes/bible_es_en/run.sh       # print the commands
#
# Settings: recipes/bible_es_en/config.sh (each can be set from the environment).
set -euo pipefail
source "$(dirname "$0")/config.sh"
source "$REPO/recipes/common/pipeline.sh"
run_pipeline "$@"
