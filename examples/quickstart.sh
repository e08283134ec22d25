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
#   5. fairseq-kd evaluate: fairseq-generate (greedy, beam 5) on the test slice,
#      sacreBLEU/chrF with signatures, translation speed; fairseq-kd table
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

COMMON=(--optimizer adam --adam-betas '(0.9, 0.98)' --lr 0.0015 --lr-scheduler inverse_sqrt
        --warmup-updates 100 --clip-norm 1.0 --dropout 0.1 --max-tokens 4096
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

step "5. translate the test set (greedy and beam 5) and score"
for sys in teacher:teacher/checkpoint_best.pt student_baseline:student_baseline/checkpoint_last.pt \
           student_word_kd:student_word_kd/checkpoint_last.pt; do
  name=${sys%%:*}
  grep -q "\"name\": \"$name\"" results.json 2>/dev/null || fairseq-kd evaluate --data bin \
    --checkpoint "${sys#*:}" --name "$name" --ref raw/test.en --results results.json --beam 5 --cpu
done
echo
fairseq-kd table results.json
