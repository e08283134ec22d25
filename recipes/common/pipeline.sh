# Shared KD pipeline, sourced by recipes/*/run.sh after the recipe's config.sh.
#
# Steps, in order (each skips finished work, so a rerun resumes):
#   prepare   the recipe's prepare.sh writes $WORK/raw/{train,valid,test}.{$SRC,$TGT}
#   spm       fairseq-kd spm: joint SentencePiece model + pieces      -> $WORK/pieces
#   binarize  fairseq-preprocess (joined dictionary)                  -> $WORK/bin
#   teacher   fairseq-train, early stopping on valid loss             -> $WORK/teacher
#             (skipped with TEACHER_PATH: spm and binarize then use its vocabulary)
#   corpus    fairseq-kd corpus: Seq-KD (beam) and Seq-Inter corpora, sharded over the GPUs
#             (TEACHER_CT2, an external CTranslate2 teacher: no teacher is trained and the
#             corpus step comes before spm and binarize, EXTERNAL_STEPS: the teacher
#             translates the raw text, and the students' SentencePiece model is trained on
#             the source and that translation)
#   cache     fairseq-kd cache-teacher: the teacher's top-$CACHE_TOPK distributions for the
#             methods in $CACHE_METHODS (gold folder, or the distilled one for seq_word_kd)
#   students  fairseq-train, one student per method in $METHODS, $STUDENT_JOBS at once
#   checkpoint (only STUDENT_CHECKPOINT=choose) the baseline's best checkpoint against the mean
#             of its last $AVERAGE_LAST, on the validation split; the better one (greedy BLEU)
#             is used for every student                       -> $WORK/checkpoint_choice
#   prune     fairseq-kd prune $PRUNE_FROM to each ratio of $PRUNE_RATIO, retrain on the distilled
#             corpus with the mask held, $STUDENT_JOBS at a time
#   finetune  (only with FINETUNE_FROM) fine-tune that student's checkpoint once per run of
#             $FINETUNE_METHODS for $FINETUNE_MINUTES of wall clock each   -> $WORK/student_ft_<run>
#   export    fairseq-kd export: every student's $STUDENT_CHECKPOINT checkpoint (best or last)
#             as a stock-fairseq checkpoint                          -> $WORK/exported
#   evaluate  fairseq-kd evaluate: greedy + beam, sacreBLEU/chrF, speed   -> $WORK/results.json
#             (+ a "NAME (ct2 Q)" row per system and quantization Q in $CT2_QUANT)
#   report    fairseq-kd table + plot -> $RESULTS_MD, $PLOT_DIR/*.png; cpu_converged adds
#             the learning curves (fairseq-kd curves), the gap to the teacher and paired
#             significance in the table, and the test hypotheses (fairseq-kd hypotheses)
# and, only when named:
#   ship      the teacher for inference (float16, no optimizer), its SentencePiece
#             model and dictionary, scored on the test split, with a provenance
#             note                                                  -> $SHIP_DIR
#   ship_students  the same for each student in $SHIP_STUDENTS (default: baseline seq_kd)
#             whose training has finished: its $STUDENT_CHECKPOINT checkpoint
#                                                     -> $SHIP_STUDENTS_DIR/NAME
#
# finetune, report, ship and ship_students live in finetune.sh, report.sh and ship.sh beside
# this file (sourced below).
#
# A step is finished when its stamp $WORK/done/<name> exists (written only
# after success) or, for evaluation, when results.json holds the system.
# Training resumes from checkpoint_last.pt by itself (fairseq), corpus
# building from its saved chunks (fairseq-kd corpus).  Delete a stamp to
# redo a step.  `run.sh STEP...` runs only the named steps; DRY_RUN=1 prints
# the commands instead of running them.

PIPELINE_STEPS="prepare spm binarize teacher corpus cache students checkpoint prune finetune export evaluate report"
# TEACHER_CT2: the teacher's text comes first, the students' vocabulary is made from it (no
# cache: an external teacher has no distributions over the students' vocabulary)
EXTERNAL_STEPS="prepare teacher corpus spm binarize students checkpoint prune finetune export evaluate report"
# The methods an external teacher (TEACHER_CT2) can teach: they need its translations only
EXTERNAL_METHODS="baseline seq_kd seq_inter"
NAMED_STEPS="ship ship_students"  # run only when named: `run.sh ship`, `run.sh ship_students`
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
USER_DIR=$REPO/fairseq_kd
DRY_RUN=${DRY_RUN:-}

log() { printf '[%s %s] %s\n' "$RECIPE" "$(date +%H:%M:%S)" "$*"; }
die() { log "error: $*" >&2; exit 1; }

# Run a command, or print it (shell-quoted, one line starting with RUN:) under DRY_RUN.
run_cmd() {
  if [ -n "$DRY_RUN" ]; then printf 'RUN:'; printf ' %q' "$@"; printf '\n'; return 0; fi
  "$@"
}

# run_logged LOG CMD...: output to LOG; on failure show its tail.
run_logged() {
  local logfile=$1; shift
  if [ -n "$DRY_RUN" ]; then run_cmd "$@"; return 0; fi
  mkdir -p "$(dirname "$logfile")"
  if ! "$@" >>"$logfile" 2>&1; then
    tail -n 40 "$logfile" >&2
    die "failed: $1 ... (full log: $logfile)"
  fi
}

is_done() { [ -z "$DRY_RUN" ] && [ -e "$WORK/done/$1" ]; }
mark_done() { [ -n "$DRY_RUN" ] || { mkdir -p "$WORK/done"; date > "$WORK/done/$1"; }; }
skip() { log "skip $1 (done; delete $WORK/done/$1 to redo)"; }

# ---- devices -------------------------------------------------------------
# GPUS: comma-separated CUDA ids, "auto" (all GPUs nvidia-smi lists) or "cpu".
resolve_devices() {
  if [ "$GPUS" = auto ]; then
    local n=0
    command -v nvidia-smi >/dev/null 2>&1 && n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ "$n" -gt 0 ]; then GPUS=$(seq -s, 0 $((n - 1))); else GPUS=cpu; fi
    # the gpu profile's models and parallel students would take days on a CPU
    [ "$GPUS" != cpu ] || [ "$PROFILE" != gpu ] || die "GPUS=auto found no GPU (nvidia-smi lists none): PROFILE=gpu sizes its teacher and $STUDENT_JOBS parallel students for a GPU; use PROFILE=cpu (or GPUS=cpu to run the gpu profile on the CPU anyway)"
    log "GPUS=auto: ${GPUS/#cpu/no GPU found, the CPU}"
  fi
  if [ "$GPUS" = cpu ] || [ -z "$GPUS" ]; then
    GPUS=cpu NGPU=0 DEVICE_ARGS=(--cpu) FP16_ARGS=()
    # the cores split between the jobs that run at once (students in parallel)
    local cores; cores=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / STUDENT_JOBS > 0 ? cores / STUDENT_JOBS : 1 ))}
  else
    NGPU=$(tr ',' '\n' <<<"$GPUS" | grep -c .)
    DEVICE_ARGS=()
    FP16_ARGS=(); [ "${FP16:-0}" = 1 ] && FP16_ARGS=(--fp16)
    export CUDA_VISIBLE_DEVICES=$GPUS
  fi
  FIRST_GPU=${GPUS%%,*}
}

# GPUs of parallel job number $1 (0-based): all GPUs when jobs run one at a
# time (fairseq-train then trains on all of them), else one GPU per job,
# round robin (several jobs share a GPU when there are more jobs than GPUs).
job_gpus() {
  if [ "$NGPU" = 0 ] || [ "$STUDENT_JOBS" = 1 ]; then echo "$GPUS"; return; fi
  tr ',' '\n' <<<"$GPUS" | sed -n "$(( $1 % NGPU + 1 ))p"
}

# ---- steps ----------------------------------------------------------------
step_prepare() {
  local f missing=
  for f in train valid test; do
    [ -s "$WORK/raw/$f.$SRC" ] && [ -s "$WORK/raw/$f.$TGT" ] || missing=1
  done
  if is_done prepare && [ -z "$missing" ]; then skip prepare; return; fi
  log "prepare: $RECIPE_DIR/prepare.sh -> $WORK/raw"
  run_cmd bash "$RECIPE_DIR/prepare.sh"
  mark_done prepare
}

# The teacher every student learns from: TEACHER_PATH, or the one the teacher step trains.
teacher_checkpoint() { echo "${TEACHER_PATH:-$WORK/teacher/checkpoint_best.pt}"; }

# require_teacher_files: TEACHER_PATH and the vocabulary files that come with it exist.
require_teacher_files() {
  local f
  for f in "$TEACHER_PATH" "$TEACHER_SPM" "$TEACHER_DICT"; do
    [ -n "$DRY_RUN" ] || [ -s "$f" ] || die "TEACHER_PATH=$TEACHER_PATH: $f not found (set TEACHER_SPM and TEACHER_DICT to its SentencePiece model and dictionary)"
  done
}

# check_external_teacher: TEACHER_CT2 alone (not with TEACHER_PATH), a converted model folder, and
# METHODS that need nothing of it but its translations (PRUNE_FROM is one of them).
check_external_teacher() {
  [ -n "$TEACHER_CT2" ] || return 0
  [ -z "$TEACHER_PATH" ] || die "TEACHER_CT2 and TEACHER_PATH are two teachers: set one"
  [ -n "$DRY_RUN" ] || [ -s "$TEACHER_CT2/model.bin" ] || die "TEACHER_CT2=$TEACHER_CT2: no CTranslate2 model there (model.bin; a folder of ct2-opus-mt-converter, ct2-transformers-converter, ...)"
  local m
  for m in $METHODS; do
    [[ " $EXTERNAL_METHODS " == *" $m "* ]] || die "METHODS: $m needs the teacher's distributions over the student's vocabulary, and TEACHER_CT2 (an external teacher) gives only its translations: use seq_kd (or seq_inter), e.g. METHODS=\"baseline seq_kd\""
  done
}

# teacher_prefix_args: TEACHER_PREFIX_ARGS becomes the external teacher's language codes as options.
teacher_prefix_args() {
  TEACHER_PREFIX_ARGS=()
  [ -z "$TEACHER_SRC_LANG" ] || TEACHER_PREFIX_ARGS+=(--source-prefix "$TEACHER_SRC_LANG")
  [ -z "$TEACHER_TGT_LANG" ] || TEACHER_PREFIX_ARGS+=(--target-prefix "$TEACHER_TGT_LANG")
}

# With TEACHER_CT2: the students' SentencePiece model trained on the source and the teacher's
# translation (the Seq-KD student's training text), then every corpus encoded with it.
external_spm() {
  log "spm: students' SentencePiece vocabulary of $VOCAB on the source and TEACHER_CT2's translation -> $WORK/pieces_distilled"
  run_logged "$WORK/logs/spm.log" fairseq-kd spm --input-dir "$WORK/distilled_text" --src "$SRC" --tgt "$TGT" \
    --splits train --vocab-size "$VOCAB" --out "$WORK/pieces_distilled"
  log "spm: the gold corpus with it -> $WORK/pieces"
  run_logged "$WORK/logs/spm.log" fairseq-kd spm --input-dir "$WORK/raw" --src "$SRC" --tgt "$TGT" \
    --model "$WORK/pieces_distilled/spm.model" --out "$WORK/pieces"
  if uses_seq_inter; then
    run_logged "$WORK/logs/spm.log" fairseq-kd spm --input-dir "$WORK/distilled_inter_text" --src "$SRC" \
      --tgt "$TGT" --splits train --model "$WORK/pieces_distilled/spm.model" --out "$WORK/pieces_distilled_inter"
  fi
}

in_methods() { [[ " $METHODS " == *" $1 "* ]]; }
uses_seq_inter() { in_methods seq_inter; }

step_spm() {
  if is_done spm; then skip spm; return; fi
  if [ -n "$TEACHER_CT2" ]; then
    external_spm
  elif [ -n "$TEACHER_PATH" ]; then
    require_teacher_files
    log "spm: the teacher's SentencePiece model $TEACHER_SPM -> $WORK/pieces"
    run_logged "$WORK/logs/spm.log" fairseq-kd spm --input-dir "$WORK/raw" --src "$SRC" --tgt "$TGT" \
      --model "$TEACHER_SPM" --out "$WORK/pieces"
  else
    log "spm: joint SentencePiece vocabulary of $VOCAB -> $WORK/pieces"
    run_logged "$WORK/logs/spm.log" fairseq-kd spm --input-dir "$WORK/raw" --src "$SRC" --tgt "$TGT" \
      --vocab-size "$VOCAB" --out "$WORK/pieces"
  fi
  mark_done spm
}

# binarize_to DEST TRAINPREF ARGS...: fairseq-preprocess of TRAINPREF and the gold valid/test pieces
# into DEST (joined dictionary), replacing DEST.
binarize_to() {
  local dest=$1 train=$2; shift 2
  [ -n "$DRY_RUN" ] || rm -rf "$dest"
  run_logged "$WORK/logs/binarize.log" fairseq-preprocess -s "$SRC" -t "$TGT" \
    --trainpref "$train" --validpref "$WORK/pieces/valid.sp" \
    --testpref "$WORK/pieces/test.sp" --destdir "$dest" --joined-dictionary \
    --workers "$PREPROCESS_WORKERS" "$@"
}

# With TEACHER_CT2: the distilled corpus first, its dictionary (the pieces of the text the
# Seq-KD student learns) then binarizes the gold corpus (baseline, evaluation) and Seq-Inter's.
external_binarize() {
  log "binarize -> $WORK/distilled (its dictionary), $WORK/bin (gold) and, for seq_inter, $WORK/distilled_inter"
  binarize_to "$WORK/distilled" "$WORK/pieces_distilled/train.sp"
  binarize_to "$WORK/bin" "$WORK/pieces/train.sp" --srcdict "$WORK/distilled/dict.$SRC.txt"
  if uses_seq_inter; then
    binarize_to "$WORK/distilled_inter" "$WORK/pieces_distilled_inter/train.sp" --srcdict "$WORK/distilled/dict.$SRC.txt"
  fi
}

step_binarize() {
  if is_done binarize; then skip binarize; return; fi
  if [ -n "$TEACHER_CT2" ]; then external_binarize; mark_done binarize; return; fi
  # with TEACHER_PATH, the teacher's dictionary: the students' tokens are the teacher's
  local dict=(); [ -z "$TEACHER_PATH" ] || { require_teacher_files; dict=(--srcdict "$TEACHER_DICT"); }
  log "binarize -> $WORK/bin${TEACHER_PATH:+, dictionary of TEACHER_PATH: $TEACHER_DICT}"
  [ -n "$DRY_RUN" ] || rm -rf "$WORK/bin"
  run_logged "$WORK/logs/binarize.log" fairseq-preprocess -s "$SRC" -t "$TGT" \
    --trainpref "$WORK/pieces/train.sp" --validpref "$WORK/pieces/valid.sp" \
    --testpref "$WORK/pieces/test.sp" --destdir "$WORK/bin" --joined-dictionary \
    --workers "$PREPROCESS_WORKERS" "${dict[@]}"
  mark_done binarize
}

# train_args NAME DATA ARGS...: TRAIN_ARGS becomes the fairseq-train command line that
# trains into $WORK/NAME (what train runs; ship_students writes it into a README).
train_args() {
  local name=$1 data=$2; shift 2
  # shellcheck disable=SC2086  # option strings from config.sh are split on purpose
  TRAIN_ARGS=(fairseq-train "$data" --user-dir "$USER_DIR" \
    --source-lang "$SRC" --target-lang "$TGT" --save-dir "$WORK/$name" \
    "${DEVICE_ARGS[@]}" "${FP16_ARGS[@]}" $OPTIM_ARGS --max-tokens "$MAX_TOKENS" \
    --seed "$SEED" --log-format simple --log-interval 50 "$@")
}

# train NAME DATA ARGS...: fairseq-train into $WORK/NAME (resumes from its checkpoint_last.pt).
train() {
  train_args "$@"
  run_logged "$WORK/logs/$1.log" "${TRAIN_ARGS[@]}"
}

# epochs_since_best DIR: how many epochs DIR/checkpoint_last.pt is past
# DIR/checkpoint_best.pt (empty when either is missing).
epochs_since_best() {
  # nothing to read (a run not begun, a dry run) costs no Python start-up with torch
  [ -f "$1/checkpoint_best.pt" ] && [ -f "$1/checkpoint_last.pt" ] || return 0
  python3 - "$1" <<'PY'
import os, sys
import torch
epochs = []
for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
    path = os.path.join(sys.argv[1], name)
    if not os.path.isfile(path):
        sys.exit(0)
    epochs.append(torch.load(path, map_location="cpu", weights_only=False)["extra_state"]["train_iterator"]["epoch"])
print(epochs[1] - epochs[0])
PY
}

# option_value OPTION ARGS...: the value given to OPTION in ARGS (empty if absent)
option_value() {
  local opt=$1; shift
  while [ $# -gt 1 ]; do [ "$1" = "$opt" ] && { echo "$2"; return; }; shift; done
}

# early_stopped DIR TRAIN_ARGS...: true when DIR's best checkpoint is already
# --patience epochs old.  fairseq counts --patience within one run (a resumed
# run counts afresh from its first validation), so a run that has early-stopped
# would otherwise train on when resumed.  (The students' task, translation_kd,
# keeps the count in its checkpoints, so their resumed runs also stop on time;
# the teacher's task, fairseq's translation, does not.)
early_stopped() {
  local dir=$1 patience stale; shift
  patience=$(option_value --patience "$@")
  [ -n "$patience" ] && [ "$patience" -gt 0 ] || return 1
  stale=$(epochs_since_best "$dir")
  [ -n "$stale" ] && [ "$stale" -ge "$patience" ] || return 1
  log "$(basename "$dir"): early-stopped (its best checkpoint is $stale epochs old, --patience $patience)"
}

step_teacher() {
  if [ -n "$TEACHER_CT2" ]; then
    log "teacher: TEACHER_CT2=$TEACHER_CT2 (an external CTranslate2 teacher, not trained)"
    return
  fi
  if [ -n "$TEACHER_PATH" ]; then
    require_teacher_files
    log "teacher: TEACHER_PATH=$TEACHER_PATH (not trained)"
    return
  fi
  if is_done teacher; then skip teacher; return; fi
  # shellcheck disable=SC2086
  if early_stopped "$WORK/teacher" $TEACHER_TRAIN; then mark_done teacher; return; fi
  log "teacher: $TEACHER_ARGS $TEACHER_TRAIN (log: $WORK/logs/teacher.log)"
  # shellcheck disable=SC2086
  train teacher "$WORK/bin" --task translation --criterion label_smoothed_cross_entropy \
    --label-smoothing "$LABEL_SMOOTHING" --no-epoch-checkpoints $TEACHER_ARGS $TEACHER_TRAIN
  mark_done teacher
}

# corpus NAME ARGS...: the teacher's translation of the training split -> $WORK/NAME.
corpus() {
  local name=$1; shift
  if is_done "$name"; then skip "$name"; return; fi
  # CORPUS_WORKERS unset: fairseq-kd corpus's default (--workers 0), one process per visible GPU;
  # on CPU one process using every core (its --threads default: the cores / workers)
  local workers=${CORPUS_WORKERS:-0}
  log "corpus $name: $* (workers: ${CORPUS_WORKERS:-default}; log: $WORK/logs/$name.log)"
  run_logged "$WORK/logs/$name.log" fairseq-kd corpus "$WORK/bin" --path "$(teacher_checkpoint)" \
    -s "$SRC" -t "$TGT" --out "$WORK/$name" --workers "$workers" --no-progress-bar --backend "$CORPUS_BACKEND" \
    --max-tokens "$CORPUS_MAX_TOKENS" --max-len-a "$MAX_LEN_A" --max-len-b "$MAX_LEN_B" \
    "${DEVICE_ARGS[@]}" "${FP16_ARGS[@]}" "$@"
  mark_done "$name"
}

# external_corpus NAME ARGS...: TEACHER_CT2's translation of the raw training text -> $WORK/NAME,
# a raw corpus (the source, the translation, the gold valid and test).
external_corpus() {
  local name=$1; shift
  if is_done "$name"; then skip "$name"; return; fi
  log "corpus $name: TEACHER_CT2 $* (log: $WORK/logs/$name.log)"
  run_logged "$WORK/logs/$name.log" fairseq-kd corpus "$WORK/raw" --teacher-ct2 "$TEACHER_CT2" \
    "${TEACHER_PREFIX_ARGS[@]}" -s "$SRC" -t "$TGT" --out "$WORK/$name" --workers "${CORPUS_WORKERS:-0}" \
    --no-progress-bar --max-tokens "$CORPUS_MAX_TOKENS" --max-len-a "$MAX_LEN_A" --max-len-b "$MAX_LEN_B" \
    "${DEVICE_ARGS[@]}" "$@"
  mark_done "$name"
}

step_corpus() {
  if [ -n "$TEACHER_CT2" ]; then
    external_corpus distilled_text --beam "$BEAM"
    if uses_seq_inter; then external_corpus distilled_inter_text --seq-inter "$SEQ_INTER_N"; fi
    return
  fi
  corpus distilled --beam "$BEAM"
  local m
  for m in $METHODS; do
    case $m in
      seq_kd_filtered) reuse_decoding distilled distilled_filtered ;;
      # MBR-1 keeps the first of MBR-n's picks: with both, one decode serves the two
      seq_kd_mbr) if in_methods seq_kd_mbr_n; then
                    variant_corpus seq_kd_mbr_n
                    reuse_decoding distilled_mbr_n distilled_mbr
                  fi ;;
    esac
    variant_corpus "$m"
  done
}

# variant_corpus METHOD: METHOD's own corpus (corpus_variant), if it has one.
variant_corpus() {
  # shellcheck disable=SC2046
  [ -z "$(corpus_variant "$1")" ] || corpus "$(corpus_variant "$1")" $(corpus_variant_args "$1")
}

# reuse_decoding FROM TO: TO starts from FROM's decoded chunks (its train.work), which
# fairseq-kd corpus resumes from: --filter acts when the chunks are merged and binds
# none of their settings, and chunks saved with --keep n serve a smaller --keep, so the
# filtered and the MBR-1 corpus cost no second decode (unless FROM's chunks were saved
# by a version that kept no teacher scores).
reuse_decoding() {
  local from=$WORK/$1/train.work to=$WORK/$2/train.work
  if is_done "$2" || [ -e "$to" ] || [ ! -d "$from" ]; then return; fi
  [ -n "$DRY_RUN" ] || python3 -c 'import sys; from fairseq_kd.corpus.work import chunks_hold_scores
sys.exit(not chunks_hold_scores(sys.argv[1]))' "$from" || return 0
  log "corpus $2: starts from the beam search of $1 ($from)"
  run_cmd mkdir -p "$WORK/$2"
  run_cmd cp -r "$from" "$to"
}

# The methods that train seq_kd on a corpus of their own: its folder, and what builds it.
corpus_variant() {
  case $1 in
    seq_inter) echo distilled_inter ;;
    seq_kd_mbr) echo distilled_mbr ;;
    seq_kd_mbr_n) echo distilled_mbr_n ;;
    seq_kd_nbest) echo distilled_nbest ;;
    seq_kd_filtered) echo distilled_filtered ;;
  esac
}
corpus_variant_args() {
  case $1 in
    seq_inter) echo "--seq-inter $SEQ_INTER_N --post-process sentencepiece" ;;
    # MBR over the teacher's N-best list with a chrF utility (of the detokenized text)
    seq_kd_mbr) echo "--select mbr --candidates $MBR_N --utility chrf --post-process sentencepiece" ;;
    seq_kd_mbr_n) echo "--select mbr --candidates $MBR_N --utility chrf --keep $MBR_KEEP --post-process sentencepiece" ;;
    seq_kd_nbest) echo "--candidates $NBEST_N --keep $NBEST_KEEP" ;;
    seq_kd_filtered) echo "--beam $BEAM --filter all" ;;
  esac
}

# The page's corpora: the beam corpus and each METHODS' own.
corpora_setting() {
  local m text="Seq-KD beam $BEAM"
  for m in $METHODS; do
    case $m in
      seq_inter) text+="; Seq-Inter $SEQ_INTER_N-best, sentence BLEU" ;;
      seq_kd_mbr) text+="; seq_kd_mbr: MBR (chrF) over the $MBR_N-best" ;;
      seq_kd_mbr_n) text+="; seq_kd_mbr_n: the $MBR_KEEP best by MBR (chrF) over the $MBR_N-best, as pairs" ;;
      seq_kd_nbest) text+="; seq_kd_nbest: the $NBEST_KEEP best of the $NBEST_N-best, as pairs" ;;
      seq_kd_filtered) text+="; seq_kd_filtered: the beam corpus with \`--filter all\`" ;;
    esac
  done
  echo "$text"
}

# uses_cache METHOD: whether METHOD reads the teacher's cached distributions (CACHE_METHODS)
uses_cache() { [[ " $CACHE_METHODS " == *" $1 "* ]]; }

# The cache a method reads: over the folder it trains on (its target prefixes).
cache_dir() {
  case $1 in
    seq_word_kd) echo "$WORK/teacher_cache_distilled" ;;
    *) echo "$WORK/teacher_cache" ;;
  esac
}

# cache_teacher DATA OUT: the teacher's top-k distributions on DATA's train and valid targets.
cache_teacher() {
  local data=$1 out=$2 name; name=$(basename "$2")
  if is_done "$name"; then skip "$name"; return; fi
  log "cache $name: top-$CACHE_TOPK of the teacher over $(basename "$data") (log: $WORK/logs/$name.log)"
  run_logged "$WORK/logs/$name.log" fairseq-kd cache-teacher "$data" --teacher-path "$(teacher_checkpoint)" \
    -s "$SRC" -t "$TGT" --out "$out" --splits train,valid --topk "$CACHE_TOPK" --dtype float16 \
    --max-tokens "$MAX_TOKENS" --no-progress-bar "${DEVICE_ARGS[@]}" "${FP16_ARGS[@]}"
  mark_done "$name"
}

step_cache() {
  local m out built=" "
  for m in $METHODS; do
    uses_cache "$m" || continue
    out=$(cache_dir "$m")
    [[ "$built" == *" $out "* ]] || cache_teacher "$(method_data "$m")" "$out"
    built+="$out "
  done
}

# Method settings: config.sh (or the environment) may set ARGS_<method>;
# these defaults are the settings of the README's examples.
: "${ARGS_baseline=}"
: "${ARGS_word_kd=--kd-alpha 0.5 --kd-temperature 1}"
: "${ARGS_seq_kd=}"
: "${ARGS_seq_inter=}"
: "${ARGS_seq_word_kd=--word-kd-alpha 0.5 --kd-temperature 1}"
# selective word-level KD (Wang et al. 2021): KD only on the half of the words the student finds
# hardest, the threshold from a queue of the last 30,000 words
: "${ARGS_word_kd_selective=--kd-alpha 0.5 --kd-temperature 1 --kd-select global --kd-select-ratio 0.5 --kd-select-queue 30000}"
# seq_kd on other corpora (corpus_variant): the training options are seq_kd's
: "${ARGS_seq_kd_mbr=}"
: "${ARGS_seq_kd_mbr_n=}"
: "${ARGS_seq_kd_nbest=}"
: "${ARGS_seq_kd_filtered=}"
# on-policy distillation (GKD) with the distilled corpus as its supervised branch; in no profile's METHODS
: "${ARGS_onpolicy_kd=--onpolicy-ratio 0.5 --jsd-beta 0.5}"
: "${ARGS_hybrid_kd=--gate complexity --kd-temperature 1}"
# the same mixture with a fixed gate: does the learned gate earn its place?
: "${ARGS_hybrid_fixed=--gate fixed --gate-value 0.5 --kd-temperature 1}"
: "${ARGS_ckd=--kd-alpha 0.5 --ckd-beta 0.2 --layer-map regular --ckd-side encoder}"
: "${ARGS_a2d=--kd-alpha 0.5 --a2d-beta 1 --a2d-decay 0.9 --attn-types enc,dec,cross}"

# The data folder and fairseq-train options of one method.
method_data() {
  local variant; variant=$(corpus_variant "$1")
  if [ -n "$variant" ]; then echo "$WORK/$variant"; return; fi
  case $1 in
    seq_kd | seq_word_kd | onpolicy_kd) echo "$WORK/distilled" ;;
    *) echo "$WORK/bin" ;;
  esac
}
# Every student trains with --task translation_kd and the teacher's path: the
# task is fairseq's translation plus a teacher loaded only by criterions that
# use it (so ARGS_seq_kd="--word-kd-alpha 0.5" works too) and --prune-mask.
method_args() {
  local extra_var="ARGS_$1"
  # onpolicy_kd's loss is a divergence between two distributions: no label smoothing
  [ "$1" = onpolicy_kd ] || echo "--label-smoothing $LABEL_SMOOTHING"
  if [ -n "$TEACHER_CT2" ]; then
    echo "--task translation_kd"  # an external teacher: the students learn its text, not its model
  elif uses_cache "$1"; then
    echo "--task translation_kd --teacher-cache $(cache_dir "$1") --kd-topk $CACHE_TOPK"
  else
    echo "--task translation_kd --teacher-path $(teacher_checkpoint)"
  fi
  case $1 in
    baseline) echo "--criterion label_smoothed_cross_entropy" ;;
    word_kd | ckd | a2d | onpolicy_kd) echo "--criterion $1" ;;
    word_kd_selective) echo "--criterion word_kd" ;;
    seq_kd | seq_inter | seq_word_kd | seq_kd_mbr | seq_kd_mbr_n | seq_kd_nbest | seq_kd_filtered)
      echo "--criterion seq_kd" ;;
    hybrid_kd | hybrid_fixed) echo "--distilled-data $WORK/distilled --num-batch-buckets 0 --criterion hybrid_kd" ;;
    *) die "unknown method '$1' in METHODS (known: baseline word_kd word_kd_selective seq_kd seq_word_kd seq_inter seq_kd_mbr seq_kd_mbr_n seq_kd_nbest seq_kd_filtered hybrid_kd hybrid_fixed ckd a2d onpolicy_kd)" ;;
  esac
  echo "${!extra_var:-}"
}

# student_train_args NAME: TRAIN_ARGS becomes the fairseq-train command line of student NAME.
student_train_args() {
  # shellcheck disable=SC2046,SC2086
  train_args "student_$1" "$(method_data "$1")" $(method_args "$1") $STUDENT_ARGS $STUDENT_TRAIN \
    $STUDENT_VALID $STUDENT_SAVE
}

train_student() {
  local name=$1 gpus=$2
  # shellcheck disable=SC2086
  if ! early_stopped "$WORK/student_$name" $STUDENT_TRAIN; then
    student_train_args "$name"
    CUDA_VISIBLE_DEVICES=${gpus/#cpu/} run_logged "$WORK/logs/student_$name.log" "${TRAIN_ARGS[@]}"
  fi
  mark_done "student_$name"
  [ -n "$DRY_RUN" ] || log "student $name finished"
}

# adopted_folder NAME: STUDENTS_FROM's folder of student NAME, when it ships one (else fails).
adopted_folder() {
  [ -n "$STUDENTS_FROM" ] && [ -f "$STUDENTS_FROM/$1/student.pt" ] || return 1
  echo "$STUDENTS_FROM/$1"
}

# adopt_student NAME DIR: the shipped student in DIR becomes student NAME of the study, trained:
# its weights the checkpoint the study uses (checkpoint_kind), its training.json the curve
# the report reads.  Refused when DIR was shipped from another kind of checkpoint or encodes
# with another dictionary than the study's data.
adopt_student() {
  local name=$1 dir=$2 kind shipped
  kind=$(checkpoint_kind) || exit 1
  [ -f "$dir/training.json" ] || die "adopt $name: $dir has no training.json (a student shipped by ship_students has)"
  shipped=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["checkpoint"])' "$dir/training.json") \
    || die "adopt $name: $dir/training.json names no checkpoint"
  [ "$shipped" = "checkpoint_$kind.pt" ] || die "adopt $name: $dir ships its $shipped, the study uses checkpoint_$kind.pt (STUDENT_CHECKPOINT=$STUDENT_CHECKPOINT)"
  [ -n "$DRY_RUN" ] || cmp -s "$dir/dict.txt" "$WORK/bin/dict.$TGT.txt" \
    || die "adopt $name: $dir/dict.txt is not the study's dictionary ($WORK/bin/dict.$TGT.txt)"
  log "student $name: adopted from $dir (STUDENTS_FROM; trained to its end elsewhere, not trained again)"
  run_cmd mkdir -p "$WORK/student_$name" "$WORK/logs"
  run_cmd cp "$dir/student.pt" "$WORK/student_$name/checkpoint_$kind.pt"
  run_cmd cp "$dir/training.json" "$WORK/logs/student_$name.json"
  mark_done "student_$name"
}

# adopted_names: the students of METHODS adopted from STUDENTS_FROM (their curve is a training.json).
adopted_names() {
  local name
  for name in $METHODS; do [ ! -e "$WORK/logs/student_$name.json" ] || echo "$name"; done
}

step_students() {
  local name dir
  for name in $METHODS; do method_args "$name" >/dev/null; done  # unknown names fail early
  for name in $METHODS; do
    if ! is_done "student_$name" && dir=$(adopted_folder "$name"); then adopt_student "$name" "$dir"; fi
  done
  # shellcheck disable=SC2086
  in_slots "" train_student "students" $METHODS
}

# in_slots PREFIX FUNCTION WHAT ITEMS...: FUNCTION ITEM GPUS for every ITEM whose stamp
# student_PREFIXITEM is missing, STUDENT_JOBS at a time (one in a dry run); dies naming
# WHAT that did not finish.
in_slots() {
  local prefix=$1 fn=$2 what=$3 item name i=0 names=() jobs=$STUDENT_JOBS gpus; shift 3
  [ -z "$DRY_RUN" ] || jobs=1
  for item in "$@"; do
    name=$prefix$item
    if is_done "student_$name"; then skip "student_$name"; continue; fi
    gpus=$(job_gpus "$i"); i=$((i + 1))
    # a free slot first, so the log says when each one starts
    [ "$jobs" = 1 ] || while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    log "student $name on ${gpus:-cpu} (log: $WORK/logs/student_$name.log)"
    if [ "$jobs" = 1 ]; then "$fn" "$item" "$gpus"; continue; fi
    "$fn" "$item" "$gpus" & names+=("$name")
  done
  wait
  # a job's stamp, not its exit status (wait -n may already have reaped it), says it finished
  local failed=
  for name in "${names[@]}"; do [ -e "$WORK/done/student_$name" ] || failed+=" $name"; done
  [ -z "$failed" ] || die "$what failed:$failed (see $WORK/logs/student_$prefix*.log)"
}

# pruned_names: the pruned students, one per ratio of PRUNE_RATIO, each pruned from the
# trained PRUNE_FROM: pruned_FROM for a single ratio, prunedPCT_FROM for several
# (PRUNE_FROM=word_kd PRUNE_RATIO="0.5 0.8": pruned50_word_kd, pruned80_word_kd).
pruned_names() {
  [ -n "$PRUNE_FROM" ] || return 0
  # shellcheck disable=SC2086
  set -- $PRUNE_RATIO
  if [ $# = 1 ]; then echo "pruned_$PRUNE_FROM"; return; fi
  local ratio
  for ratio; do echo "pruned$(awk -v r="$ratio" 'BEGIN { printf "%d", r * 100 + 0.5 }')_$PRUNE_FROM"; done
}

# pruned_ratio NAME: the ratio of PRUNE_RATIO the pruned student NAME was pruned to.
pruned_ratio() {
  local wanted=$1 ratio
  # shellcheck disable=SC2046
  set -- $(pruned_names)
  for ratio in $PRUNE_RATIO; do
    [ "$1" != "$wanted" ] || { echo "$ratio"; return; }
    shift
  done
}

# pruned_file NAME: the pruned weights of the pruned student NAME before retraining (the
# mask beside them: .mask.pt); $WORK/pruned/FROM.pt for a single ratio, FROM.PCT.pt for several.
pruned_file() {
  local tag=${1%%_*}
  tag=${tag#pruned}
  echo "$WORK/pruned/$PRUNE_FROM${tag:+.$tag}.pt"
}

# prune_stamp NAME: the stamp of pruned student NAME's pruning (prune_FROM, prunePCT_FROM).
prune_stamp() { echo "${1/pruned/prune}"; }

# The pruned students retrain STUDENT_JOBS at a time, like the students.
step_prune() {
  [ -n "$PRUNE_FROM" ] || return 0
  local name pending=
  for name in $(pruned_names); do is_done "$(prune_stamp "$name")" || pending=1; done
  if [ -n "$pending" ]; then
    in_methods "$PRUNE_FROM" || die "PRUNE_FROM=$PRUNE_FROM is not one of METHODS ($METHODS)"
    # an average is written here, once, not by each job at the same time
    use_checkpoint "$PRUNE_FROM"
  fi
  # shellcheck disable=SC2046
  in_slots "" prune_and_retrain "pruning" $(pruned_names)
}

# prune_and_retrain NAME GPUS: the trained PRUNE_FROM pruned to NAME's ratio, then retrained
# with the mask held on GPUS until PRUNE_TRAIN stops it.
prune_and_retrain() {
  local name=$1 gpus=$2 out ratio stamp
  out=$(pruned_file "$name") ratio=$(pruned_ratio "$name") stamp=$(prune_stamp "$name")
  if ! is_done "$stamp"; then
    log "prune $PRUNE_FROM: ratio $ratio -> $out"
    run_cmd mkdir -p "$WORK/pruned"
    run_logged "$WORK/logs/$stamp.log" fairseq-kd prune --path "$(student_checkpoint "$PRUNE_FROM")" \
      --ratio "$ratio" --out "$out"
    mark_done "$stamp"
  fi
  # Start from the pruned weights once; a resumed run continues from its own checkpoint_last.pt.
  local start=()
  [ -e "$WORK/student_$name/checkpoint_last.pt" ] || read -ra start <<< "$(pruned_start_args "$name")"
  log "retrain $name with the mask held (log: $WORK/logs/student_$name.log)"
  # shellcheck disable=SC2086
  if ! early_stopped "$WORK/student_$name" $PRUNE_TRAIN; then
    pruned_train_args "$name" "${start[@]}"
    CUDA_VISIBLE_DEVICES=${gpus/#cpu/} run_logged "$WORK/logs/student_$name.log" "${TRAIN_ARGS[@]}"
  fi
  mark_done "student_$name"
  [ -n "$DRY_RUN" ] || log "student $name finished"
}

# pruned_start_args NAME: the options of the pruned student NAME's first run, which starts from
# the pruned weights with a fresh optimizer, data order, learning-rate schedule and meters.
pruned_start_args() {
  echo "--restore-file $(pruned_file "$1") --reset-optimizer --reset-dataloader --reset-lr-scheduler --reset-meters"
}

# pruned_train_args NAME [START...]: TRAIN_ARGS becomes the fairseq-train command line that
# retrains the pruned student NAME with its mask held (START: the options of its first run).
pruned_train_args() {
  local name=$1 mask
  shift
  mask=$(pruned_file "$name")
  # shellcheck disable=SC2046,SC2086
  train_args "student_$name" "$(method_data "$PRUNE_FROM")" \
    $(method_args "$PRUNE_FROM") --prune-mask "${mask%.pt}.mask.pt" "$@" \
    $STUDENT_ARGS $PRUNE_TRAIN $STUDENT_VALID $STUDENT_SAVE
}

# ---- the checkpoint every student is used from (STUDENT_CHECKPOINT) --------
# checkpoint_kind: the stem STEM of each student's used checkpoint_STEM.pt: best, last or
# avgN (average: the mean of its last AVERAGE_LAST checkpoints, fairseq-kd average); with
# choose, what the checkpoint step chose for the baseline (a dry run, before that choice,
# prints the placeholder best_or_avgN).
checkpoint_kind() {
  local kind=$STUDENT_CHECKPOINT
  if [ "$kind" = choose ]; then
    kind=$(cat "$WORK/checkpoint_choice" 2>/dev/null) || kind=
    if [ -z "$kind" ]; then
      [ -n "$DRY_RUN" ] || die "STUDENT_CHECKPOINT=choose: nothing chosen yet ($WORK/checkpoint_choice); the checkpoint step chooses once the baseline has trained"
      kind=best_or_avg$AVERAGE_LAST
    fi
  fi
  [ "$kind" != average ] || kind=avg$AVERAGE_LAST
  echo "$kind"
}

# checkpoint_setting: checkpoint_kind in words (the results page, a shipped student's README).
checkpoint_setting() {
  local kind what; kind=$(checkpoint_kind)
  case $kind in
    best) what="the one with the best validation $([ -n "$STUDENT_VALID" ] && echo BLEU || echo loss)" ;;
    last) what="the last one saved" ;;
    avg[0-9]*) what="the mean of its last $AVERAGE_LAST checkpoints (fairseq-kd average)" ;;
    *) what="best or the mean of its last $AVERAGE_LAST, whichever the checkpoint step chooses" ;;
  esac
  [ "$STUDENT_CHECKPOINT" != choose ] || what+=", chosen by the baseline's greedy validation BLEU (STUDENT_CHECKPOINT=choose)"
  echo "$what"
}

# student_checkpoint NAME: the checkpoint of student NAME that is used (checkpoint_kind).
# A fine-tuned student (ft_*) is compared where its budget ended: its last checkpoint.
student_checkpoint() {
  case $1 in
    ft_*) echo "$WORK/student_$1/checkpoint_last.pt" ;;
    *) echo "$WORK/student_$1/checkpoint_$(checkpoint_kind).pt" ;;
  esac
}

# use_checkpoint NAME: student NAME's used checkpoint, made if it is an average: written
# (fairseq-kd average) once, again when the student trained on after it.  Dies, in this
# shell, when STUDENT_CHECKPOINT=choose has chosen nothing yet.
use_checkpoint() {
  local name=$1 kind dir=$WORK/student_$1 out
  [[ $name != ft_* ]] || return 0
  kind=$(checkpoint_kind) || exit 1
  [[ $kind =~ ^avg[0-9]+$ ]] || return 0
  out=$dir/checkpoint_$kind.pt
  if [ -z "$DRY_RUN" ] && [ -s "$out" ] && ! [ "$dir/checkpoint_last.pt" -nt "$out" ]; then return 0; fi
  log "average $name: the mean of its last $AVERAGE_LAST checkpoints -> $out"
  run_logged "$WORK/logs/average.log" fairseq-kd average --dir "$dir" --last "$AVERAGE_LAST" --out "$out"
}

# checkpoint (STUDENT_CHECKPOINT=choose): the baseline's best checkpoint and the mean of its
# last AVERAGE_LAST translated (greedy and beam $BEAM) on the validation split; the one with
# the higher greedy BLEU is used for every student, KD or not (decided on the baseline, the
# same for all).  The best checkpoint was itself picked by greedy
# validation BLEU on these sentences, so the comparison leans its way, not the average's.
step_checkpoint() {
  [ "$STUDENT_CHECKPOINT" = choose ] || return 0
  if [ -z "$DRY_RUN" ] && [ -s "$WORK/checkpoint_choice" ]; then
    log "skip checkpoint (chose $(cat "$WORK/checkpoint_choice"); delete $WORK/checkpoint_choice to choose again)"
    return
  fi
  in_methods baseline || die "STUDENT_CHECKPOINT=choose compares the baseline's checkpoints: add baseline to METHODS, or set STUDENT_CHECKPOINT to best, last or average"
  [ -n "$DRY_RUN" ] || is_done student_baseline || die "STUDENT_CHECKPOINT=choose: the baseline has not finished training"
  local kind results=$WORK/checkpoints.json
  STUDENT_CHECKPOINT=average use_checkpoint baseline
  for kind in best "avg$AVERAGE_LAST"; do
    RESULTS=$results EVAL_SPLIT=valid evaluate "baseline ($kind)" "baseline ($kind)" \
      "$WORK/student_baseline/checkpoint_$kind.pt" --batch-size "$EVAL_BATCH_SIZE" "${FP16_ARGS[@]}"
  done
  [ -z "$DRY_RUN" ] || return 0
  kind=$(python3 - "$results" "avg$AVERAGE_LAST" <<'PY'
import json, sys
scores = {s["name"]: s["greedy"]["bleu"] for s in json.load(open(sys.argv[1]))["systems"]}
best, average = scores["baseline (best)"], scores[f"baseline ({sys.argv[2]})"]
print(sys.argv[2] if average > best else "best")
PY
) || die "checkpoint: cannot read $results"
  echo "$kind" > "$WORK/checkpoint_choice.tmp" && mv "$WORK/checkpoint_choice.tmp" "$WORK/checkpoint_choice"
  log "checkpoint: every student is used from its checkpoint_$kind.pt (the baseline's higher greedy valid BLEU)"
}

student_names() {
  echo $METHODS
  pruned_names
  finetune_names
}

# student_finished NAME: whether student NAME's training has finished (its stamp); export and
# evaluate take only these, so a study reports each student as it finishes.  A dry run
# assumes all have.
student_finished() { [ -n "$DRY_RUN" ] || [ -e "$WORK/done/student_$1" ]; }

finished_students() {
  local name
  for name in $(student_names); do if student_finished "$name"; then echo "$name"; fi; done
}

# unfinished_students: the others, in one line (the log, the results page).
unfinished_students() {
  local name
  for name in $(student_names); do student_finished "$name" || echo "$name"; done | xargs
}

step_export() {
  local name waiting
  waiting=$(unfinished_students)
  [ -z "$waiting" ] || log "export, evaluate: not yet for $waiting (training not finished)"
  for name in $(finished_students); do
    if is_done "export_$name"; then skip "export_$name"; continue; fi
    use_checkpoint "$name"
    log "export $name -> $WORK/exported/$name.pt"
    run_cmd mkdir -p "$WORK/exported"
    run_logged "$WORK/logs/export.log" fairseq-kd export \
      --path "$(student_checkpoint "$name")" --out "$WORK/exported/$name.pt"
    mark_done "export_$name"
  done
}

has_result() {
  [ -z "$DRY_RUN" ] && [ -s "$RESULTS" ] && python3 - "$RESULTS" "$1" <<'PY'
import json, sys
names = {s["name"] for s in json.load(open(sys.argv[1]))["systems"]}
sys.exit(0 if sys.argv[2] in names else 1)
PY
}

# evaluate ROW NAME CHECKPOINT [ARGS...]: one system at a time on one GPU (or the CPU), so speeds
# compare; ROW is the name fairseq-kd evaluate records (NAME, or "NAME (ct2 Q)" with --backend
# ctranslate2) in $RESULTS, translating the split EVAL_SPLIT (default test) against its reference.
evaluate() {
  local row=$1 name=$2 ckpt=$3 split=${EVAL_SPLIT:-test}; shift 3
  if has_result "$row"; then log "skip evaluate $row (in $RESULTS)"; return; fi
  log "evaluate $row${EVAL_SPLIT:+ on $split}"
  CUDA_VISIBLE_DEVICES=${FIRST_GPU/#cpu/} run_logged "$WORK/logs/evaluate.log" fairseq-kd evaluate \
    --data "$WORK/bin" --gen-subset "$split" --checkpoint "$ckpt" --name "$name" --ref "$WORK/raw/$split.$TGT" \
    --results "$RESULTS" --beam "$BEAM" --max-len-a "$MAX_LEN_A" --max-len-b "$MAX_LEN_B" \
    "${DEVICE_ARGS[@]}" "$@"
}

# evaluate_all NAME CHECKPOINT [ARGS...]: the PyTorch row, then a CTranslate2 row per $CT2_QUANT.
evaluate_all() {
  local name=$1 ckpt=$2 q; shift 2
  evaluate "$name" "$name" "$ckpt" --batch-size "$EVAL_BATCH_SIZE" "${FP16_ARGS[@]}" "$@"
  # CTranslate2 rows: fairseq-kd evaluate's batch size for CTranslate2 on this device
  for q in $CT2_QUANT; do
    evaluate "$name (ct2 $q)" "$name" "$ckpt" --backend ctranslate2 --quantization "$q"
  done
}

# evaluate_external_teacher: TEACHER_CT2 on the raw test text, as it translated the corpus.
evaluate_external_teacher() {
  if has_result teacher; then log "skip evaluate teacher (in $RESULTS)"; return; fi
  log "evaluate teacher (TEACHER_CT2, raw text)"
  CUDA_VISIBLE_DEVICES=${FIRST_GPU/#cpu/} run_logged "$WORK/logs/evaluate.log" fairseq-kd evaluate \
    --teacher-ct2 "$TEACHER_CT2" "${TEACHER_PREFIX_ARGS[@]}" --src-text "$WORK/raw/test.$SRC" --name teacher \
    --ref "$WORK/raw/test.$TGT" --results "$RESULTS" --beam "$BEAM" --max-len-a "$MAX_LEN_A" \
    --max-len-b "$MAX_LEN_B" "${DEVICE_ARGS[@]}"
}

step_evaluate() {
  local name
  if [ -n "$TEACHER_CT2" ]; then evaluate_external_teacher; else evaluate_all teacher "$(teacher_checkpoint)"; fi
  # students are evaluated from their exported files with stock fairseq (no plugin); the
  # CTranslate2 rows convert the same files
  for name in $(finished_students); do evaluate_all "$name" "$WORK/exported/$name.pt" --no-user-dir; done
}

# The steps with files of their own (functions only, like the above)
for part in finetune report ship; do source "$(dirname "${BASH_SOURCE[0]}")/$part.sh"; done

run_pipeline() {
  local default_steps=$PIPELINE_STEPS; [ -z "$TEACHER_CT2" ] || default_steps=$EXTERNAL_STEPS
  local steps=${*:-$default_steps} s
  for s in $steps; do
    [[ " $PIPELINE_STEPS $NAMED_STEPS " == *" $s "* ]] || die "unknown step '$s' (steps: $PIPELINE_STEPS $NAMED_STEPS)"
  done
  [[ " best last average choose " == *" $STUDENT_CHECKPOINT "* ]] || die "STUDENT_CHECKPOINT must be best, last, average or choose, got '$STUDENT_CHECKPOINT'"
  [[ $AVERAGE_LAST =~ ^[1-9][0-9]*$ ]] || die "AVERAGE_LAST must be a number of checkpoints (1 or more), got '$AVERAGE_LAST'"
  check_external_teacher
  teacher_prefix_args
  resolve_devices
  RESULTS=${RESULTS:-$WORK/results.json}
  mkdir -p "$WORK"
  log "work folder $WORK, devices: $GPUS, methods: $METHODS"
  for s in $steps; do "step_$s"; done
  log "finished: $steps"
}
