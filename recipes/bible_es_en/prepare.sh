#!/usr/bin/env bash
# Step "prepare" of the Bible recipe: the Spanish-English Bible corpus
# (shipped in examples/data, or $BIBLE_DIR) -> $WORK/raw/{train,valid,test}.{es,en}.
set -euo pipefail
source "$(dirname "$0")/config.sh"
source "$REPO/recipes/common/data.sh"
bible_slice "$WORK/raw"
wc -l "$WORK"/raw/*.es
