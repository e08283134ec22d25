# bible_slice DEST: the first $TRAIN_LINES / $VALID_LINES / $TEST_LINES pairs (0 = all)
# of each split of the Spanish-English Bible corpus, as DEST/{train,valid,test}.{es,en}.
# Source: $BIBLE_DIR (a folder with those files, e.g. ../shared/data/bible.es-en)
# or, when it is empty, the copy shipped in examples/data/bible.es-en.tar.xz.
bible_slice() {
  local dest=$1 src_dir=${BIBLE_DIR:-} tmp= split lang n
  if [ -z "$src_dir" ]; then
    tmp=$(mktemp -d)
    tar -xJf "$REPO/examples/data/bible.es-en.tar.xz" -C "$tmp"
    src_dir=$tmp/bible.es-en
  fi
  mkdir -p "$dest"
  for split in train valid test; do
    case $split in train) n=$TRAIN_LINES ;; valid) n=$VALID_LINES ;; test) n=$TEST_LINES ;; esac
    for lang in es en; do
      [ -s "$src_dir/$split.$lang" ] || { echo "bible_slice: $src_dir/$split.$lang not found" >&2; return 1; }
      if [ "$n" = 0 ]; then cp "$src_dir/$split.$lang" "$dest/$split.$lang.tmp"
      else head -n "$n" "$src_dir/$split.$lang" > "$dest/$split.$lang.tmp"; fi
      mv "$dest/$split.$lang.tmp" "$dest/$split.$lang"
    done
  done
  [ -z "$tmp" ] || rm -rf "$tmp"
}
