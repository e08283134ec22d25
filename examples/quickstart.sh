#!/usr/bin/env bash
# Quickstart (what `make demo` runs): distil the teacher shipped in
# examples/teacher/ into a small student on CPU, and compare it with the same
# student trained for the same time without KD, on the Bible es-en corpus
# shipped in examples/data.
#
#   1. data: the first TRAIN_LINES training pairs, 500 valid, TEST_LINES test,
#      encoded with the teacher's SentencePiece model (fairseq-kd spm --model)
#      and binarized with its dictionary
#   2. what the students learn from, computed once before they train (as a
#      user would, and not counted in their minutes):
#        seq_kd    the teacher's translations of the training sources (beam 5,
#                  fairseq-kd corpus --backend ctranslate2)
#        word_kd   the teacher's top-8 distributions on the gold prefixes
#                  (fairseq-kd cache-teacher), read by --teacher-cache: the
#                  online teacher would cost every update a teacher forward pass
#                  (measured here: 180 updates in 3 minutes instead of 315)
#   3. students: 3+3 layers, 128-dim (transformer_student_tiny), STUDENT_MINUTES each
#        baseline  label_smoothed_cross_entropy on the gold targets
#        seq_kd    the same on the teacher's translations (Kim & Rush 2016)
#        word_kd   --criterion word_kd --kd-topk 8 on the gold targets
#   4. fairseq-kd evaluate (greedy and beam 5, sacreBLEU/chrF with signatures,
#      sentences/s) of the teacher and every student; fairseq-kd table
#   5. only when STUDENTS_DIR (examples/students) holds students shipped by the
#      recipes' ship_students step (trained to convergence by the Bible study):
#      each scored the same way on the same test sentences and shown in a table
#      of its own, then a few test sentences side by side (fairseq-kd
#      side-by-side: source, reference, the teacher's and each shipped
#      student's translation)
#
# Training is bounded by wall time (fairseq's --stop-time-hours), so each
# student gets the same minutes whatever the machine; a faster machine trains
# further.  Finished steps are skipped on a second run.
# Variables (environment): WORK, METHODS (default "seq_kd word_kd"),
# STUDENT_MINUTES, TRAIN_LINES, TEST_LINES, VOCAB, TEACHER_DIR (a folder with
# teacher.pt, spm.model, dict.txt), STUDENTS_DIR (default examples/students:
# shipped students, a folder NAME/ each, with student.pt and the teacher's
# dict.txt), and TEACHER: shipped (use TEACHER_DIR),
# train (train one from scratch for TEACHER_MINUTES: on CPU far too short to
# converge, so KD then has little to teach) or auto (the default: shipped when
# TEACHER_DIR holds a teacher, else train).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${WORK:-$REPO/work/quickstart}
METHODS=${METHODS:-seq_kd word_kd}
STUDENT_MINUTES=${STUDENT_MINUTES:-3}
TRAIN_LINES=${TRAIN_LINES:-8000}
TEST_LINES=${TEST_LINES:-500}
TEACHER=${TEACHER:-auto}
TEACHER_DIR=${TEACHER_DIR:-$REPO/examples/teacher}
TEACHER_MINUTES=${TEACHER_MINUTES:-6}
STUDENTS_DIR=${STUDENTS_DIR:-$REPO/examples/students}
VOCAB=${VOCAB:-8000}                  # TEACHER=train only (a shipped teacher brings its own)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
USER_DIR=$REPO/fairseq_kd

hours() { python3 -c "print($1 / 60)"; }
step() { printf '\n=== %s\n' "$*"; }
if [ "$TEACHER" = auto ]; then
  TEACHER=train; [ -s "$TEACHER_DIR/teacher.pt" ] && TEACHER=shipped
fi
case $TEACHER in
  shipped) for f in teacher.pt spm.model dict.txt; do
             [ -s "$TEACHER_DIR/$f" ] || { echo "quickstart: $TEACHER_DIR/$f not found (TEACHER=train trains one)" >&2; exit 2; }
           done ;;
  train) ;;
  *) echo "quickstart: TEACHER must be auto, shipped or train, not '$TEACHER'" >&2; exit 2 ;;
esac
for m in $METHODS; do
  case $m in seq_kd | word_kd) ;; *) echo "quickstart: METHODS may hold seq_kd and word_kd, not '$m'" >&2; exit 2 ;; esac
done
# Students shipped in STUDENTS_DIR, the baseline first: scored only with the shipped teacher,
# whose vocabulary encodes the test sentences, and only those that share it.
SHIPPED=()
if [ "$TEACHER" = shipped ]; then
  for dir in "$STUDENTS_DIR"/baseline/ "$STUDENTS_DIR"/*/; do
    dir=${dir%/}
    [ -s "$dir/student.pt" ] && [[ " ${SHIPPED[*]} " != *" $dir "* ]] || continue
    if cmp -s "$dir/dict.txt" "$TEACHER_DIR/dict.txt"; then SHIPPED+=("$dir")
    else echo "quickstart: $dir: its dict.txt is not the teacher's, so it is not scored" >&2; fi
  done
fi
mkdir -p "$WORK/raw"
cd "$WORK"

step "1. data: first $TRAIN_LINES training pairs, 500 valid, $TEST_LINES test (Bible es-en)"
if [ ! -s bin/test.es-en.en.idx ]; then
  tar -xJf "$REPO/examples/data/bible.es-en.tar.xz"
  for split_n in train:$TRAIN_LINES valid:500 test:$TEST_LINES; do
    split=${split_n%%:*} n=${split_n##*:}
    for lang in es en; do head -n "$n" "bible.es-en/$split.$lang" > "raw/$split.$lang"; done
  done
  if [ "$TEACHER" = shipped ]; then
    fairseq-kd spm --input-dir raw --src es --tgt en --model "$TEACHER_DIR/spm.model" --out pieces
    DICT=(--srcdict "$TEACHER_DIR/dict.txt")
  else
    fairseq-kd spm --input-dir raw --src es --tgt en --vocab-size "$VOCAB" --out pieces
    DICT=()
  fi
  fairseq-preprocess -s es -t en --trainpref pieces/train.sp --validpref pieces/valid.sp \
    --testpref pieces/test.sp --destdir bin --joined-dictionary "${DICT[@]}" --workers 2
fi

COMMON=(--optimizer adam --adam-betas '(0.9, 0.98)' --lr 0.0015 --lr-scheduler inverse_sqrt
        --warmup-updates 200 --clip-norm 1.0 --dropout 0.1 --max-tokens 4096
        --label-smoothing 0.1 --share-all-embeddings --cpu --seed 1
        --log-format simple --log-interval 20 --no-epoch-checkpoints --num-workers 0)

if [ "$TEACHER" = shipped ]; then
  T=$TEACHER_DIR/teacher.pt
  step "2. teacher: $T (see $TEACHER_DIR/README.md)"
else
  T=teacher/checkpoint_best.pt
  step "2. teacher: training one for $TEACHER_MINUTES min"
  [ -s "$T" ] || fairseq-train bin --user-dir "$USER_DIR" --save-dir teacher \
    --arch transformer_student_small --criterion label_smoothed_cross_entropy "${COMMON[@]}" \
    --stop-time-hours "$(hours "$TEACHER_MINUTES")"
fi

if [[ " $METHODS " == *" seq_kd "* ]]; then
  step "3. seq_kd: the teacher's translations of the $TRAIN_LINES training sources (beam 5, CTranslate2)"
  [ -s distilled/train.es-en.en.idx ] || fairseq-kd corpus bin --path "$T" -s es -t en --out distilled \
    --backend ctranslate2 --beam 5 --max-len-a 1.5 --max-len-b 10 --cpu
fi
if [[ " $METHODS " == *" word_kd "* ]]; then
  step "3. word_kd: the teacher's top-8 distributions on the training and valid targets"
  fairseq-kd cache-teacher bin --teacher-path "$T" --out teacher_cache --splits train,valid --topk 8 --cpu
fi

# student NAME DATA ARGS...: $STUDENT_MINUTES of training into student_NAME
student() {
  local name=$1 data=$2; shift 2
  step "4. student $name ($STUDENT_MINUTES min)"
  [ -s "student_$name/checkpoint_last.pt" ] || fairseq-train "$data" --user-dir "$USER_DIR" \
    --save-dir "student_$name" --arch transformer_student_tiny "${COMMON[@]}" "$@" \
    --stop-time-hours "$(hours "$STUDENT_MINUTES")"
}
student baseline bin --criterion label_smoothed_cross_entropy
for m in $METHODS; do
  case $m in
    seq_kd) student seq_kd distilled --criterion label_smoothed_cross_entropy ;;
    word_kd) student word_kd bin --task translation_kd --teacher-cache teacher_cache --criterion word_kd \
               --kd-alpha 0.5 --kd-temperature 1 --kd-topk 8 ;;
  esac
done

step "5. translate the $TEST_LINES test sentences (greedy and beam 5) and score"
for name in teacher baseline $METHODS; do
  ckpt=student_$name/checkpoint_last.pt
  [ "$name" = teacher ] && ckpt=$T
  grep -q "\"name\": \"$name\"" results.json 2>/dev/null || fairseq-kd evaluate --data bin \
    --checkpoint "$ckpt" --name "$name" --ref raw/test.en --results results.json --beam 5 --cpu
done
if [ ${#SHIPPED[@]} = 0 ]; then
  echo
  fairseq-kd table results.json --baseline baseline
  exit 0
fi

SHIPPED_ROWS=()
step "6. the students shipped in ${STUDENTS_DIR#"$REPO"/}: the same $TEST_LINES test sentences"
for dir in "${SHIPPED[@]}"; do
  row="$(basename "$dir") (shipped)"
  SHIPPED_ROWS+=("$row")
  grep -qF "\"name\": \"$row\"" results.json || fairseq-kd evaluate --data bin --checkpoint "$dir/student.pt" \
    --name "$row" --ref raw/test.en --results results.json --beam 5 --cpu --no-user-dir
done
step "results: the first $STUDENT_MINUTES minutes of training, the pipeline end to end"
echo
fairseq-kd table results.json --baseline baseline --systems teacher baseline $METHODS
step "results: converged students shipped in ${STUDENTS_DIR#"$REPO"/} (how each was trained: its README.md)"
echo
BASE=()  # the shipped baseline's differences, when there is one (it comes first)
if [ "$(basename "${SHIPPED[0]}")" = baseline ]; then BASE=(--baseline "baseline (shipped)"); fi
fairseq-kd table results.json "${BASE[@]}" --systems teacher "${SHIPPED_ROWS[@]}"
step "7. a few test sentences side by side: the teacher and the shipped students (beam 5)"
echo
fairseq-kd side-by-side results.json --src raw/test.es --ref raw/test.en --systems teacher "${SHIPPED_ROWS[@]}"
