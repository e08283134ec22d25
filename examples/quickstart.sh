#!/usr/bin/env bash
# Quickstart (what `make demo` runs): distil a small teacher into a smaller
# student with word-level KD on the Bible es-en corpus shipped in the repo,
# on CPU, and compare it with the same student trained without KD.
#
#   1. a slice of examples/data/bible.es-en.tar.xz -> SentencePiece (joint vocab)
#   2. fairseq-preprocess
#   3. teacher: 3+3 layers, 256-dim       (TEACHER_MINUTES of training)
#   4. students: 2+2 layers, 128-dim      (STUDENT_MINUTES each)
#        - baseline: label_smoothed_cross_entropy
#        - word_kd:  --task translation_kd --teacher-path ... --criterion word_kd
#   5. fairseq-generate (beam 5) on the test slice, sacreBLEU/chrF table
#
# Training is bounded by wall time (fairseq's --stop-time-hours), so the demo
# takes about 15 minutes on 2 cores whatever the machine's speed; a faster
# machine trains further.  Finished steps are skipped on a second run.
# Variables (environment): WORK, TRAIN_LINES, TEST_LINES, VOCAB,
# TEACHER_MINUTES, STUDENT_MINUTES.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${WORK:-$REPO/work/quickstart}
TRAIN_LINES=${TRAIN_LINES:-12000}
TEST_LINES=${TEST_LINES:-500}
VOCAB=${VOCAB:-4000}
TEACHER_MINUTES=${TEACHER_MINUTES:-6}
STUDENT_MINUTES=${STUDENT_MINUTES:-3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
USER_DIR=$REPO/fairseq_kd

hours() { python3 -c "print($1 / 60)"; }
step() { printf '\n=== %s\n' "$*"; }
mkdir -p "$WORK/raw"
cd "$WORK"

step "1. data: first $TRAIN_LINES training pairs, 500 valid, $TEST_LINES test (Bible es-en)"
if [ ! -s pieces/test.sp.en ]; then
  tar -xJf "$REPO/examples/data/bible.es-en.tar.xz"
  for split_n in train:$TRAIN_LINES valid:500 test:$TEST_LINES; do
    split=${split_n%%:*} n=${split_n##*:}
    for lang in es en; do head -n "$n" "bible.es-en/$split.$lang" > "raw/$split.$lang"; done
  done
  fairseq-kd spm --input-dir raw --src es --tgt en --vocab-size "$VOCAB" --out pieces
fi

step "2. binarize"
[ -s bin/train.es-en.en.idx ] || fairseq-preprocess -s es -t en \
  --trainpref pieces/train.sp --validpref pieces/valid.sp --testpref pieces/test.sp \
  --destdir bin --joined-dictionary --workers 2

COMMON=(--optimizer adam --adam-betas '(0.9, 0.98)' --lr 0.001 --lr-scheduler inverse_sqrt
        --warmup-updates 400 --clip-norm 1.0 --dropout 0.1 --max-tokens 4096
        --label-smoothing 0.1 --share-all-embeddings --cpu --seed 1
        --log-format simple --log-interval 20 --no-epoch-checkpoints --num-workers 0)
STUDENT=(--arch transformer --encoder-layers 2 --decoder-layers 2
         --encoder-embed-dim 128 --decoder-embed-dim 128
         --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
         --encoder-attention-heads 4 --decoder-attention-heads 4)

step "3. teacher ($TEACHER_MINUTES min)"
[ -s teacher/checkpoint_best.pt ] || fairseq-train bin --user-dir "$USER_DIR" --save-dir teacher \
  --arch transformer_student_small --criterion label_smoothed_cross_entropy "${COMMON[@]}" \
  --stop-time-hours "$(hours "$TEACHER_MINUTES")"

step "4a. student without KD ($STUDENT_MINUTES min)"
[ -s student_baseline/checkpoint_last.pt ] || fairseq-train bin --user-dir "$USER_DIR" \
  --save-dir student_baseline "${STUDENT[@]}" --criterion label_smoothed_cross_entropy \
  "${COMMON[@]}" --stop-time-hours "$(hours "$STUDENT_MINUTES")"

step "4b. student with word_kd ($STUDENT_MINUTES min)"
[ -s student_word_kd/checkpoint_last.pt ] || fairseq-train bin --user-dir "$USER_DIR" \
  --save-dir student_word_kd "${STUDENT[@]}" --task translation_kd \
  --teacher-path teacher/checkpoint_best.pt --criterion word_kd --kd-alpha 0.5 --kd-temperature 1 \
  "${COMMON[@]}" --stop-time-hours "$(hours "$STUDENT_MINUTES")"

step "5. translate the test set (beam 5) and score"
# --required-batch-size-multiple 1: otherwise fairseq-generate drops the last
# partial batch of the test set without a word.
translate() {  # checkpoint -> detokenized hypotheses, in test-set order
  fairseq-generate bin --user-dir "$USER_DIR" --path "$1" --gen-subset test --beam 5 \
    --max-len-a 1.5 --max-len-b 10 --batch-size 64 --required-batch-size-multiple 1 \
    --cpu --post-process sentencepiece > "$2.gen"
  grep '^H-' "$2.gen" | sed 's/^H-//' | sort -n -k1,1 | cut -f3 > "$2"
}
for sys in teacher:teacher/checkpoint_best.pt baseline:student_baseline/checkpoint_last.pt \
           word_kd:student_word_kd/checkpoint_last.pt; do
  [ -s "hyp.${sys%%:*}" ] || translate "${sys#*:}" "hyp.${sys%%:*}"
done
echo
fairseq-kd score --ref raw/test.en teacher=hyp.teacher student_baseline=hyp.baseline \
  student_word_kd=hyp.word_kd --json scores.json
