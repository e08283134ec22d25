# Data helpers of the prepare steps.

# corpus_slice SRC_DIR DEST: SRC_DIR/{train,valid,test}.{$SRC,$TGT} -> DEST, the
# first $TRAIN_LINES / $VALID_LINES / $TEST_LINES pairs of each split (0 = all).
# Refuses a missing or empty file and a split whose two sides differ in length.
corpus_slice() {
  local src_dir=$1 dest=$2 split lang n counts
  mkdir -p "$dest"
  for split in train valid test; do
    case $split in train) n=$TRAIN_LINES ;; valid) n=$VALID_LINES ;; test) n=$TEST_LINES ;; esac
    counts=
    for lang in "$SRC" "$TGT"; do
      [ -s "$src_dir/$split.$lang" ] || { echo "$RECIPE: $src_dir/$split.$lang not found or empty" >&2; return 1; }
      counts+=" $(wc -l < "$src_dir/$split.$lang")"
    done
    read -r a b <<<"$counts"
    [ "$a" = "$b" ] || { echo "$RECIPE: $src_dir/$split.$SRC has $a lines but $split.$TGT has $b" >&2; return 1; }
    for lang in "$SRC" "$TGT"; do
      if [ "$n" = 0 ]; then cp "$src_dir/$split.$lang" "$dest/$split.$lang.tmp"
      else head -n "$n" "$src_dir/$split.$lang" > "$dest/$split.$lang.tmp"; fi
      mv "$dest/$split.$lang.tmp" "$dest/$split.$lang"
    done
  done
}

# bible_slice DEST: corpus_slice of the Spanish-English Bible corpus, from
# $BIBLE_DIR (a folder {train,valid,test}.{es,en}) or, when it is empty, the
# copy shipped in examples/data/bible.es-en.tar.xz.
bible_slice() {
  local dest=$1 tmp= status=0
  if [ -n "${BIBLE_DIR:-}" ]; then SRC=es TGT=en corpus_slice "$BIBLE_DIR" "$dest"; return; fi
  tmp=$(mktemp -d)
  tar -xJf "$REPO/examples/data/bible.es-en.tar.xz" -C "$tmp"
  SRC=es TGT=en corpus_slice "$tmp/bible.es-en" "$dest" || status=$?
  rm -rf "$tmp"
  return $status
}
