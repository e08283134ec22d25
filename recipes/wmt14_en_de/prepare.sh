#!/usr/bin/env bash
# Step "prepare" of the WMT14 En-De recipe -> $WORK/raw/{train,valid,test}.{en,de}
#   train: Europarl v7 + Common Crawl + News Commentary v9 (the WMT14 training
#          data), pairs with an empty side, a side over $MAX_PAIR_LEN words or a
#          length ratio over $MAX_PAIR_RATIO dropped
#   valid: newstest2013; test: newstest2014 (full, 3003 sentences), from sacrebleu
# DATA_SOURCE=bible: a slice of the shipped Bible es-en corpus instead (no download).
# Downloads are kept in $DOWNLOAD_DIR and not fetched again.
set -euo pipefail
source "$(dirname "$0")/config.sh"

if [ "$DATA_SOURCE" = bible ]; then
  source "$REPO/recipes/common/data.sh"
  bible_slice "$WORK/raw"
  exit 0
fi
[ "$DATA_SOURCE" = wmt14 ] || { echo "prepare.sh: DATA_SOURCE must be wmt14 or bible, not '$DATA_SOURCE'" >&2; exit 1; }

URLS=(
  https://www.statmt.org/europarl/v7/de-en.tgz
  https://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz
  https://www.statmt.org/wmt14/training-parallel-nc-v9.tgz
)
# training files inside the archives (German side: .de, English side: .en)
CORPORA=(
  europarl-v7.de-en
  commoncrawl.de-en
  training/news-commentary-v9.de-en
)
mkdir -p "$DOWNLOAD_DIR" "$WORK/raw"
cd "$DOWNLOAD_DIR"
for url in "${URLS[@]}"; do
  file=$(basename "$url")
  if [ ! -e "$file.ok" ]; then
    wget -c -q --show-progress "$url" -O "$file"
    tar -xzf "$file"
    touch "$file.ok"
  fi
done

if [ ! -s "$WORK/raw/train.de" ]; then
  python3 - "$WORK/raw" "$MAX_PAIR_LEN" "$MAX_PAIR_RATIO" "${CORPORA[@]}" <<'PY'
import os, sys
out, max_len, max_ratio, corpora = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
kept = dropped = 0
with open(f"{out}/train.en.tmp", "w", encoding="utf-8") as fen, open(f"{out}/train.de.tmp", "w", encoding="utf-8") as fde:
    for prefix in corpora:
        with open(prefix + ".en", encoding="utf-8", errors="replace") as en, \
             open(prefix + ".de", encoding="utf-8", errors="replace") as de:
            for e, d in zip(en, de):
                e, d = " ".join(e.split()), " ".join(d.split())  # also removes tabs and stray newlines
                ne, nd = len(e.split()), len(d.split())
                if not ne or not nd or max(ne, nd) > max_len or max(ne, nd) > max_ratio * min(ne, nd):
                    dropped += 1
                    continue
                fen.write(e + "\n"); fde.write(d + "\n"); kept += 1
os.replace(f"{out}/train.en.tmp", f"{out}/train.en")
os.replace(f"{out}/train.de.tmp", f"{out}/train.de")
print(f"train: {kept} pairs kept, {dropped} dropped")
PY
fi

# sacrebleu downloads and caches the official test sets itself
for split_set in valid:wmt13 test:wmt14/full; do
  split=${split_set%%:*} set=${split_set#*:}
  [ -s "$WORK/raw/$split.de" ] && continue
  sacrebleu -t "$set" -l en-de --echo src > "$WORK/raw/$split.en.tmp"
  sacrebleu -t "$set" -l en-de --echo ref > "$WORK/raw/$split.de.tmp"
  mv "$WORK/raw/$split.en.tmp" "$WORK/raw/$split.en"
  mv "$WORK/raw/$split.de.tmp" "$WORK/raw/$split.de"
done
wc -l "$WORK"/raw/*.en
