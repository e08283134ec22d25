#!/usr/bin/env bash
# Step "prepare" of the custom recipe: $DATA_DIR/{train,valid,test}.{$SRC,$TGT}
# -> $WORK/raw (the first TRAIN_LINES / VALID_LINES / TEST_LINES pairs; 0 = all).
set -euo pipefail
source "$(dirname "$0")/config.sh"
source "$REPO/recipes/common/data.sh"
corpus_slice "$DATA_DIR" "$WORK/raw"
wc -l "$WORK"/raw/*."$SRC"
