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
#   prune     fairseq-kd prune $PRUNE_FROM, retrain on the distilled corpus with the mask held
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
# would otherwise train on when resumed.
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

step_students() {
  local name
  for name in $METHODS; do method_args "$name" >/dev/null; done  # unknown names fail early
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
# (PRUNE_RATIO="0.5 0.8": pruned50_seq_kd, pruned80_seq_kd).
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

step_prune() {
  [ -n "$PRUNE_FROM" ] || return 0
  local name
  for name in $(pruned_names); do prune_and_retrain "$name"; done
}

# prune_and_retrain NAME: the trained PRUNE_FROM pruned to NAME's ratio, then retrained with
# the mask held until PRUNE_TRAIN stops it.
prune_and_retrain() {
  local name=$1 out ratio stamp=${1/pruned/prune}
  out=$(pruned_file "$name") ratio=$(pruned_ratio "$name")
  if is_done "student_$name"; then skip "student_$name"; return; fi
  in_methods "$PRUNE_FROM" || die "PRUNE_FROM=$PRUNE_FROM is not one of METHODS ($METHODS)"
  if ! is_done "$stamp"; then
    use_checkpoint "$PRUNE_FROM"
    log "prune $PRUNE_FROM: ratio $ratio -> $out"
    run_cmd mkdir -p "$WORK/pruned"
    run_logged "$WORK/logs/$stamp.log" fairseq-kd prune --path "$(student_checkpoint "$PRUNE_FROM")" \
      --ratio "$ratio" --out "$out"
    mark_done "$stamp"
  fi
  # Start from the pruned weights once; a resumed run continues from its own checkpoint_last.pt.
  local start=(--restore-file "$out" --reset-optimizer --reset-dataloader --reset-lr-scheduler --reset-meters)
  [ -e "$WORK/student_$name/checkpoint_last.pt" ] && start=()
  log "retrain $name with the mask held (log: $WORK/logs/student_$name.log)"
  # shellcheck disable=SC2086
  if ! early_stopped "$WORK/student_$name" $PRUNE_TRAIN; then
    pruned_train_args "$name" "${start[@]}"
    run_logged "$WORK/logs/student_$name.log" "${TRAIN_ARGS[@]}"
  fi
  mark_done "student_$name"
}

# ---- fine-tuning a trained student (FINETUNE_FROM) ------------------------
# finetune: every run of FINETUNE_METHODS starts from FINETUNE_FROM's evaluated checkpoint
# and trains for FINETUNE_MINUTES of wall clock, e.g. continuing Seq-KD against on-policy KD
# (GKD fine-tunes a supervised student).  What makes the runs comparable:
#   - the same weights, a fresh optimizer: --finetune-from-model loads the checkpoint with
#     --reset-optimizer --reset-lr-scheduler --reset-dataloader --reset-meters (fairseq refuses
#     to restore Adam's state under another criterion, so the continued Seq-KD run resets it too);
#   - the same constant learning rate (FINETUNE_LR, --lr-scheduler fixed), optimizer
#     (FINETUNE_OPTIM), seed (SEED), data order (each method's corpus, the same for seq_kd and
#     onpolicy_kd: distilled/) and student options (STUDENT_ARGS);
#   - the same wall-clock budget.  fairseq restores the checkpoint's cumulative training time
#     (extra_state previous_training_time) even with every reset (Trainer.load_checkpoint), so
#     --stop-time-hours is that time plus the budget, fixed in the run's folder when it starts;
#   - no validation during the runs (it would spend the budget of a faster-updating run on
#     more validations); each is evaluated from its checkpoint_last.pt, where its budget ended;
#   - STUDENT_JOBS runs at a time sharing the machine, as the students step trains.
# A killed run resumes from its own checkpoint_last.pt (--finetune-from-model is used only
# while the save dir has none: fairseq's checkpoint_utils.load_checkpoint; a --restore-file
# would be loaded again on every launch) and stops at the same total: the time after its last
# save was not counted, and it saves every FINETUNE_SAVE_UPDATES updates.

# finetune_names: the fine-tuned students, ft_RUN for each RUN of FINETUNE_METHODS (none without FINETUNE_FROM).
finetune_names() {
  [ -n "$FINETUNE_FROM" ] || return 0
  local run
  for run in $FINETUNE_METHODS; do echo "ft_$run"; done
}

# finetune_method RUN: the method a run trains: RUN, or METHOD of a run METHOD_bBETA.
finetune_method() {
  if [[ $1 =~ ^(.+)_b([0-9][0-9.]*)$ ]]; then echo "${BASH_REMATCH[1]}"; else echo "$1"; fi
}

# finetune_args RUN: a run's criterion and data options: its method's (method_args), with a
# METHOD_bBETA run's --jsd-beta BETA in place of the method's own, then FINETUNE_ARGS_<RUN>.
finetune_args() {
  local method var="FINETUNE_ARGS_${1//[^A-Za-z0-9_]/_}" args
  method=$(finetune_method "$1")
  # shellcheck disable=SC2046
  args=$(echo $(method_args "$method"))
  if [ "$method" != "$1" ]; then
    args="$(sed -E 's/(^| )--jsd-beta [^ ]+//' <<<"$args") --jsd-beta ${1##*_b}"
  fi
  echo "$args ${!var:-}"
}

# checkpoint_facts CKPT...: per checkpoint one line "UPDATES HOURS LR": its number of updates,
# fairseq's cumulative training time in hours (extra_state previous_training_time) and the
# learning rate of its last update ("-" when it holds no optimizer state).
checkpoint_facts() {
  python3 - "$@" <<'PY'
import sys
import torch
for path in sys.argv[1:]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    groups = (state.get("last_optimizer_state") or {}).get("param_groups") or [{}]
    lr = groups[0].get("lr")
    print(state["optimizer_history"][-1]["num_updates"], f"{state['extra_state']['previous_training_time'] / 3600:.6f}",
          "-" if lr is None else f"{lr:.3g}")
PY
}

# finetune_budget SOURCE DIR: how a run into DIR trains, one line "START STOP MINUTES LR JOBS":
# SOURCE's cumulative training time in hours, that plus FINETUNE_MINUTES (its --stop-time-hours),
# FINETUNE_MINUTES, FINETUNE_LR and STUDENT_JOBS.  Written to DIR/finetune_budget when the run
# first starts, so a resumed run keeps its budget and the page says what each run did (delete
# DIR to start a run over).  A dry run writes nothing, and counts from 0 h without SOURCE.
finetune_budget() {
  local source=$1 record=$2/finetune_budget start=0 facts
  if [ -s "$record" ]; then cat "$record"; return; fi
  if [ -f "$source" ]; then facts=$(checkpoint_facts "$source") || return 1; start=$(cut -d' ' -f2 <<<"$facts"); fi
  awk -v s="$start" -v m="$FINETUNE_MINUTES" -v lr="$FINETUNE_LR" -v j="$STUDENT_JOBS" \
    'BEGIN { printf "%.6f %.6f %s %s %s\n", s, s + m / 60, m, lr, j }' |
    if [ -n "$DRY_RUN" ]; then cat; else mkdir -p "$2" && tee "$record"; fi
}

# check_finetune: FINETUNE_FROM's checkpoint exists and every run names a method it can train.
check_finetune() {
  local run method source; source=$(student_checkpoint "$FINETUNE_FROM")
  [[ $FINETUNE_FROM != ft_* ]] || die "FINETUNE_FROM=$FINETUNE_FROM: a fine-tuned student; name the student the runs start from (e.g. seq_kd)"
  [ -n "$DRY_RUN" ] || [ -s "$source" ] || die "FINETUNE_FROM=$FINETUNE_FROM: $source not found (train that student first: the students step with $FINETUNE_FROM in METHODS)"
  for run in $FINETUNE_METHODS; do
    method=$(finetune_method "$run")
    method_args "$method" >/dev/null  # an unknown method fails here, in one line
    [ "$method" = "$run" ] || [ "$method" = onpolicy_kd ] || die "FINETUNE_METHODS: $run: _bBETA sets --jsd-beta, an option of onpolicy_kd only"
    [ -z "$TEACHER_CT2" ] || [[ " $EXTERNAL_METHODS " == *" $method "* ]] || die "FINETUNE_METHODS: $run needs the teacher's distributions, and TEACHER_CT2 gives only its translations"
  done
}

# finetune_run RUN GPUS: one fine-tune run into $WORK/student_ft_RUN (resumes from its checkpoint_last.pt).
finetune_run() {
  local run=$1 gpus=$2 name=ft_$1 method dir budget stop source
  method=$(finetune_method "$run") dir=$WORK/student_ft_$1 source=$(student_checkpoint "$FINETUNE_FROM")
  budget=$(finetune_budget "$source" "$dir") || die "$name: cannot read $source"
  stop=$(cut -d' ' -f2 <<<"$budget")
  if [ -z "$DRY_RUN" ] && [ -f "$dir/checkpoint_last.pt" ] &&
     awk -v h="$(checkpoint_facts "$dir/checkpoint_last.pt" | cut -d' ' -f2)" -v s="$stop" 'BEGIN { exit !(h > s) }'; then
    log "$name: its budget is spent (checkpoint_last.pt is past --stop-time-hours $stop)"
  else
    # the last of an option given counts in fairseq-train: FINETUNE_ARGS_<run> (last) may override any
    local OPTIM_ARGS="$FINETUNE_OPTIM --lr $(cut -d' ' -f4 <<<"$budget") --lr-scheduler fixed"
    # shellcheck disable=SC2046,SC2086
    CUDA_VISIBLE_DEVICES=${gpus/#cpu/} train "student_$name" "$(method_data "$method")" \
      $STUDENT_ARGS --finetune-from-model "$source" --stop-time-hours "$stop" --disable-validation \
      --no-epoch-checkpoints --save-interval-updates "$FINETUNE_SAVE_UPDATES" --keep-interval-updates 1 \
      $(finetune_args "$run")
  fi
  mark_done "student_$name"
  [ -n "$DRY_RUN" ] || log "$name finished"
}

step_finetune() {
  [ -n "$FINETUNE_FROM" ] || return 0
  use_checkpoint "$FINETUNE_FROM"
  check_finetune
  local jobs=$STUDENT_JOBS
  [ -z "$DRY_RUN" ] || jobs=1
  log "finetune $FINETUNE_FROM ($(student_checkpoint "$FINETUNE_FROM")): $FINETUNE_METHODS, $FINETUNE_MINUTES min each, lr $FINETUNE_LR, $jobs at a time"
  # shellcheck disable=SC2086
  in_slots ft_ finetune_run "fine-tune runs" $FINETUNE_METHODS
}

# finetune_table_args: FT_TABLE_ARGS, fairseq-kd table's options for the fine-tuned rows: the start
# student and every run with results, tested against the first run (the continued method) with
# the paired bootstrap; false when no run has results yet.
finetune_table_args() {
  local name systems=() first=ft_${FINETUNE_METHODS%% *}
  for name in "$FINETUNE_FROM" $(finetune_names); do if reported "$name"; then systems+=("$name"); fi; done
  [[ " ${systems[*]} " == *" ft_"* ]] || return 1
  FT_TABLE_ARGS=(--systems "${systems[@]}")
  [ "$REPORT_SPEED" != 0 ] || FT_TABLE_ARGS+=(--no-speed)
  if reported "$first"; then FT_TABLE_ARGS+=(--baseline "$first" --significance "$WORK/raw/test.$TGT"); fi
}

# finetune_settings: the page's Settings rows of the fine-tune: where the runs started, and each
# run's options, budget and the updates it made in it (from its finetune_budget and checkpoint_last.pt).
finetune_settings() {
  local source run dir facts updates hours lr start minutes jobs used
  source=$(student_checkpoint "$FINETUNE_FROM") facts="? ? ?"
  if [ -f "$source" ]; then facts=$(checkpoint_facts "$source") || return 1; fi
  read -r updates hours lr <<<"$facts"
  [ "$hours" = "?" ] || hours=$(printf '%.2f' "$hours")
  printf '| fine-tune | each `ft_` run starts from `%s` (%s updates, %s h of training, last lr %s) with a fresh optimizer `%s` at a constant lr (`--lr-scheduler fixed`), seed %s and no validation, and trains for its budget of wall clock (`--stop-time-hours`: the checkpoint'"'"'s hours plus the budget); evaluated from its `checkpoint_last.pt` |\n' \
    "${source#"$WORK"/}" "$updates" "$hours" "$lr" "$FINETUNE_OPTIM" "$SEED"
  for run in $FINETUNE_METHODS; do
    dir=$WORK/student_ft_$run used="not run"
    if [ -f "$dir/checkpoint_last.pt" ] && [ -s "$dir/finetune_budget" ]; then
      read -r start _ minutes lr jobs < "$dir/finetune_budget"
      facts=$(checkpoint_facts "$dir/checkpoint_last.pt") || return 1
      read -r updates hours _ <<<"$facts"
      used=$(awk -v u="$updates" -v h="$hours" -v s="$start" -v m="$minutes" -v lr="$lr" -v j="$jobs" \
        'BEGIN { printf "budget %s min at lr %s, %s runs at a time: %d updates in %.1f min", m, lr, j, u, (h - s) * 60 }')
    fi
    printf '| ft_%s | `%s`; %s |\n' "$run" \
      "$(echo $(finetune_args "$run") | sed "s|$WORK/||g; s|$REPO/||g")" "$used"
  done
}

# finetune_md: the page's part for the fine-tune: the fine-tuned rows against the continued run.
finetune_md() {
  local table="No fine-tuned student has been evaluated yet."
  if finetune_table_args; then table=$(fairseq-kd table "$RESULTS" "${FT_TABLE_ARGS[@]}") || return 1; fi
  cat <<MD

### Fine-tuning $FINETUNE_FROM

Each \`ft_\` row fine-tunes \`$FINETUNE_FROM\`'s evaluated checkpoint (its row is the first) for
the same wall-clock budget, from the same weights with a fresh optimizer, the same constant
learning rate, seed and data order, \`STUDENT_JOBS\` runs at a time sharing the machine (Settings
below: each run's budget, rate, how many ran at a time, and the updates it made).
\`ft_${FINETUNE_METHODS%% *}\` continues the first method of \`FINETUNE_METHODS\`; the p-values
test each row against it.

$table
MD
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

step_export() {
  local name
  for name in $(student_names); do
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
  for name in $(student_names); do evaluate_all "$name" "$WORK/exported/$name.pt" --no-user-dir; done
}

step_report() {
  log "report -> $RESULTS_MD (section $(section_title)), $PLOT_DIR/$(plot_name).{speed,params}.png"
  run_cmd mkdir -p "$PLOT_DIR" "$(dirname "$RESULTS_MD")"
  [ "$REPORT_SPEED" = 0 ] || run_logged "$WORK/logs/report.log" fairseq-kd plot "$RESULTS" --x speed \
    --decoding greedy --out "$PLOT_DIR/$(plot_name).speed.png" --title "$RECIPE ($PROFILE): BLEU vs greedy speed"
  run_logged "$WORK/logs/report.log" fairseq-kd plot "$RESULTS" --x params --decoding beam --out "$PLOT_DIR/$(plot_name).params.png" \
    --title "$RECIPE ($PROFILE): BLEU (beam $BEAM) vs parameters"
  if [ "$PROFILE" = cpu_converged ]; then
    log "report: test hypotheses -> $(hypotheses_dir), learning curves -> $PLOT_DIR/$(plot_name).curves.png"
    run_logged "$WORK/logs/report.log" fairseq-kd hypotheses "$RESULTS" --ref "$WORK/raw/test.$TGT" \
      --out "$(hypotheses_dir)"
  fi
  if [ -n "$DRY_RUN" ]; then
    table_args
    run_cmd fairseq-kd table "$RESULTS" "${TABLE_ARGS[@]}"
    [ "$PROFILE" != cpu_converged ] || learning_curves
    if [ -n "$FINETUNE_FROM" ] && finetune_table_args; then run_cmd fairseq-kd table "$RESULTS" "${FT_TABLE_ARGS[@]}"; fi
    return
  fi
  # the whole section first: a failing command leaves the page as it was
  local section; section=$(write_results_md)
  replace_section "$RESULTS_MD" "$RECIPE $PROFILE${STUDY:+ $STUDY}" <<<"$section"
  cat "$RESULTS_MD"
}

# reported NAME: whether results.json holds the system NAME (a dry run, without
# results, assumes so and prints every command).
reported() { [ -n "$DRY_RUN" ] || has_result "$1"; }

# table_args: TABLE_ARGS becomes fairseq-kd table's options for the page: the
# baseline's columns; cpu_converged adds each BLEU's gap to the teacher's beam
# BLEU and the paired bootstrap p-value of each difference from the baseline.
table_args() {
  TABLE_ARGS=()
  [ "$REPORT_SPEED" != 0 ] || TABLE_ARGS+=(--no-speed)
  if reported baseline; then TABLE_ARGS+=(--baseline baseline); fi
  [ "$PROFILE" = cpu_converged ] || return 0
  if reported teacher; then TABLE_ARGS+=(--teacher teacher); fi
  if reported baseline; then TABLE_ARGS+=(--significance "$WORK/raw/test.$TGT"); fi
}

# cpu_converged: where the test hypotheses are shipped, beside the results page.
hypotheses_dir() { echo "${HYPOTHESES_DIR:-$(dirname "$RESULTS_MD")/hypotheses/$(plot_name)}"; }

# learning_curves: every student's validation BLEU by update -> $PLOT_DIR/NAME.curves.png;
# prints the table of how each converged.
learning_curves() {
  local name logs=()
  # the fine-tuned students do not validate (their own section of the page says how they trained)
  for name in $(student_names); do [[ $name == ft_* ]] || logs+=(--log "$name=$WORK/logs/student_$name.log"); done
  run_cmd fairseq-kd curves "${logs[@]}" --metric bleu --out "$PLOT_DIR/$(plot_name).curves.png" \
    --title "$RECIPE ($PROFILE): greedy validation BLEU by update"
}

# The plots' file name: one pair per recipe, profile and STUDY.
plot_name() { echo "$RECIPE$( [ "$PROFILE" = gpu ] || echo "_$PROFILE")${STUDY:+_$STUDY}"; }

# The heading of the report's section: its recipe, profile and STUDY.
section_title() { echo "$RECIPE, PROFILE=$PROFILE${STUDY:+, STUDY=$STUDY}"; }

# replace_section FILE KEY: standard input becomes the section of FILE between
# the markers <!-- results KEY --> and <!-- /results KEY --> (appended when FILE
# has none), so one page holds a section per recipe and profile and a rerun
# replaces only its own.
replace_section() {
  python3 -c '
import os, re, sys
path, key = sys.argv[1], sys.argv[2]
begin, end = f"<!-- results {key} -->", f"<!-- /results {key} -->"
section = f"{begin}\n{sys.stdin.read().strip()}\n{end}"
page = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Results\n"
pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
page = pattern.sub(lambda _: section, page) if pattern.search(page) else page.rstrip() + "\n\n" + section + "\n"
with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(page)
os.replace(path + ".tmp", path)
' "$1" "$2"
}

# The device fairseq-kd evaluate timed the systems on (one per results file),
# which need not be the machine writing the report.
results_device() {
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("device", "an unrecorded device"))' "$RESULTS"
}

# The results page: the settings that produced it, the table and the plots
# (relative links, so it can live in docs/ next to the PNGs).
write_results_md() {
  local rel table
  rel=$(page_relative "$PLOT_DIR") || return 1
  [ "$rel" = . ] && rel= || rel=$rel/
  table_args
  table=$(fairseq-kd table "$RESULTS" "${TABLE_ARGS[@]}") || return 1
  cat <<MD
## $(section_title)

Produced by \`recipes/$RECIPE/run.sh\` on $(date -u +%Y-%m-%d) (git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)).
Test set: \`raw/test.$TGT\` of the work folder ($(wc -l < "$WORK/raw/test.$TGT") sentences), $SRC -> $TGT.
$(speed_md)
Students are evaluated from their \`fairseq-kd export\` files with stock fairseq.

$table

$( [ "$REPORT_SPEED" = 0 ] || echo "![BLEU vs speed](${rel}$(plot_name).speed.png)")
![BLEU vs parameters](${rel}$(plot_name).params.png)
MD
  if [ "$PROFILE" = cpu_converged ]; then converged_md "$rel" || return 1; fi
  if [ -n "$FINETUNE_FROM" ]; then finetune_md || return 1; fi
  cat <<MD

### Settings

| | |
|---|---|
| data | $RECIPE, train $(wc -l < "$WORK/raw/train.$SRC") pairs, SentencePiece joint vocabulary $VOCAB |
| teacher | $(teacher_setting) |
| students | \`$STUDENT_ARGS $STUDENT_TRAIN\`; evaluated (and pruned) from each student's \`checkpoint_$(checkpoint_kind).pt\` ($(checkpoint_setting)) |
| optimizer | \`$OPTIM_ARGS --max-tokens $MAX_TOKENS --label-smoothing $LABEL_SMOOTHING\` |
| corpora | $(corpora_setting) |
| pruning | $(if [ -n "$PRUNE_FROM" ]; then echo "\`$PRUNE_FROM\` pruned to $(echo $PRUNE_RATIO | sed 's/ / and /g') (class-blind, each from the trained student), retrained \`$PRUNE_TRAIN\`"; else echo "none (PRUNE_FROM empty)"; fi) |
$(for m in $METHODS; do printf '| %s | `%s` |\n' "$m" "$(echo $(method_args "$m") | sed "s|$WORK/||g; s|$REPO/||g")"; done)
$([ -z "$FINETUNE_FROM" ] || finetune_settings)

Training logs: \`logs/\` of the work folder.
MD
}

# The page's sentence on translation speed.
speed_md() {
  if [ "$REPORT_SPEED" = 0 ]; then
    echo "Translation speed: not reported (REPORT_SPEED=0: the systems were scored while other jobs ran)."
    return
  fi
  cat <<MD
Translation speed: sentences/s of the translation alone (model loading excluded),
one system at a time on $(results_device): fairseq-generate with batches of
$EVAL_BATCH_SIZE sentences, and for the "(ct2 ...)" rows the model converted to
CTranslate2 with fairseq-kd evaluate's batch size for it.
MD
}

# The page's teacher: how the recipe trained it, or TEACHER_PATH (its path in the
# repository, or only its file name: the page names no path of this machine).
teacher_setting() {
  if [ -n "$TEACHER_CT2" ]; then
    echo "\`$(basename "$TEACHER_CT2")\` (TEACHER_CT2: an external CTranslate2 teacher${TEACHER_TGT_LANG:+, $TEACHER_SRC_LANG -> $TEACHER_TGT_LANG}, not trained by the recipe; the students' SentencePiece model is trained on the source and its translations)"
    return
  fi
  [ -n "$TEACHER_PATH" ] || { echo "\`$TEACHER_ARGS $TEACHER_TRAIN\`"; return; }
  local path=${TEACHER_PATH#"$REPO"/}
  [ "$path" != "$TEACHER_PATH" ] || path=$(basename "$TEACHER_PATH")
  echo "\`$path\` (TEACHER_PATH: not trained by the recipe)"
}

# page_relative PATH: PATH relative to the results page's folder (the page links it).
page_relative() {
  python3 -c 'import os,sys; print(os.path.relpath(sys.argv[1], os.path.dirname(sys.argv[2])))' "$1" "$RESULTS_MD"
}

# kim_rush_md: Kim & Rush (2016)'s table beside this study's rows that do the same (the page).
kim_rush_md() {
  local table sizes; table=$(fairseq-kd table "$RESULTS" --kim-rush) || return 1
  sizes=$(python3 - "$RESULTS" <<'PY'
import json, sys
systems = {s["name"]: s for s in json.load(open(sys.argv[1]))["systems"]}
teacher, baseline = systems.get("teacher"), systems.get("baseline")
share = f"{baseline['params'] / teacher['params']:.0%}" if teacher and baseline else "a part"
print(f"the student {share} of the teacher's parameters; our teacher's beam BLEU "
      f"{teacher['beam']['bleu']:.1f}" if teacher else f"the student {share} of the teacher's parameters")
PY
) || return 1
  cat <<MD

### Beside Kim & Rush (2016)

Kim & Rush's Table 1 (WMT14 En-De, newstest2014; an LSTM teacher of 4x1000, beam BLEU 19.5,
and students of 2x500, 38% of its parameters) beside this study's rows that do the same
thing.  What differs: the data (here $(wc -l < "$WORK/raw/train.$SRC") Bible verse pairs, $SRC -> $TGT), the models
(Transformers, $sizes) and Seq-Inter (in their combined and pruned rows, not
in ours).  Compare the gaps and gains, not the BLEU itself.

$table
MD
}

# checkpoint_md: the checkpoint step's comparison (STUDENT_CHECKPOINT=choose), for the page.
checkpoint_md() {
  [ "$STUDENT_CHECKPOINT" = choose ] && [ -s "$WORK/checkpoints.json" ] || return 0
  local table; table=$(fairseq-kd table "$WORK/checkpoints.json" --no-speed) || return 1
  cat <<MD

### Which checkpoint

The baseline's \`checkpoint_best.pt\` (its best greedy validation BLEU) against the mean of
its last $AVERAGE_LAST checkpoints (\`fairseq-kd average\`), both translating the
$(wc -l < "$WORK/raw/valid.$TGT") validation sentences (\`raw/valid.$TGT\`, not the test set).  The higher
greedy BLEU, \`checkpoint_$(checkpoint_kind).pt\`, is the kind every student above is evaluated
(and pruned) from.  The best checkpoint was picked on these same sentences, so the
comparison leans its way.

$table
MD
}

# converged_md PLOT_PREFIX: the page's part for cpu_converged: the learning curves,
# how each student converged, and where its test hypotheses are.
converged_md() {
  local summary hyps
  summary=$(learning_curves) || return 1
  hyps=$(page_relative "$(hypotheses_dir)") || return 1
  checkpoint_md || return 1
  kim_rush_md || return 1
  cat <<MD

### Convergence

Validation BLEU (greedy, the $(wc -l < "$WORK/raw/valid.$TGT") sentences of \`raw/valid.$TGT\`) of every student after each
epoch, from its training log (\`logs/student_NAME.log\`); a star marks its best validation
(the star is the \`checkpoint_best.pt\`; the one evaluated above: \`checkpoint_$(checkpoint_kind).pt\`).  Training stops after
\`--patience\` validations without a better one.

![validation BLEU by update](${1}$(plot_name).curves.png)

$summary

Students trained $STUDENT_JOBS at a time (\`STUDENT_JOBS\`) sharing the machine: the hours include that.

Test hypotheses of every row, greedy and beam, detokenized and xz-compressed, with the reference:
[\`$hyps/\`]($hyps/); rescore one with \`xz -dc FILE | sacrebleu test.$TGT\` (its README.md).
MD
}

# ship: the teacher as a user gets it (examples/teacher in this repository):
# teacher.pt (fairseq-kd export --half --portable), spm.model, dict.txt (the joined
# dictionary), evaluation.json (its test scores, stock fairseq) and README.md
# (how it was made: the settings, the commit, training time, valid loss, BLEU).
step_ship() {
  local dir=${SHIP_DIR:-$WORK/shipped_teacher}
  [ -z "$TEACHER_PATH$TEACHER_CT2" ] || die "ship: the teacher came from TEACHER_PATH or TEACHER_CT2; ship ships a teacher the recipe trained"
  log "ship the teacher -> $dir"
  run_cmd mkdir -p "$dir"
  ship_model "$WORK/teacher/checkpoint_best.pt" "$dir" teacher.pt
  ship_evaluate "$dir" teacher.pt teacher
  ship_check "$dir" teacher.pt teacher
  if [ -n "$DRY_RUN" ]; then return; fi
  ship_results "$dir"
  teacher_provenance "$dir" > "$dir/README.md.tmp" && mv "$dir/README.md.tmp" "$dir/README.md"
  cat "$dir/README.md"
}

# ship_model CHECKPOINT DIR FILE: CHECKPOINT for inference as DIR/FILE (float16, no path of this
# machine, the dictionaries embedded), with the SentencePiece model and the joined dictionary
# that encode its data.
ship_model() {
  local ckpt=$1 dir=$2 file=$3
  run_logged "$WORK/logs/ship.log" fairseq-kd export --path "$ckpt" --out "$dir/$file" --half --portable \
    --data "$WORK/bin"
  run_cmd cp "$WORK/pieces/spm.model" "$dir/spm.model"
  # SentencePiece records the paths of its training files in the model: their names only
  [ -n "$DRY_RUN" ] || python3 -c 'import sys; from fairseq_kd.shipping import write_portable_spm_model
write_portable_spm_model(sys.argv[1])' "$dir/spm.model"
  run_cmd cp "$WORK/bin/dict.$SRC.txt" "$dir/dict.txt"
}

# ship_evaluate DIR FILE NAME: DIR/FILE scored on the test split by stock fairseq, as the
# system NAME, into DIR/evaluation.json.
ship_evaluate() {
  local dir=$1 file=$2 name=$3
  [ -n "$DRY_RUN" ] || rm -f "$dir/evaluation.json"
  CUDA_VISIBLE_DEVICES=${FIRST_GPU/#cpu/} run_logged "$WORK/logs/ship.log" fairseq-kd evaluate \
    --data "$WORK/bin" --checkpoint "$dir/$file" --name "$name" --ref "$WORK/raw/test.$TGT" \
    --results "$dir/evaluation.json" --beam "$BEAM" --batch-size "$EVAL_BATCH_SIZE" \
    --max-len-a "$MAX_LEN_A" --max-len-b "$MAX_LEN_B" "${DEVICE_ARGS[@]}" --no-user-dir
}

# ship_check DIR FILE NAME: the first SHIP_CHECK_LINES test pairs scored from DIR alone
# (its spm.model, dict.txt and FILE; stock fairseq) into DIR/evaluation.check.json: the
# score tests/test_shipped_teacher.py (tests/test_shipped_students.py) reproduces from a
# clean clone.
ship_check() {
  local dir=$1 file=$2 name=$3 check=$WORK/ship_check lang
  run_cmd rm -rf "$check"
  run_cmd mkdir -p "$check/raw"
  for lang in "$SRC" "$TGT"; do
    if [ -n "$DRY_RUN" ]; then echo "RUN: head -n $SHIP_CHECK_LINES $WORK/raw/test.$lang > $check/raw/test.$lang"
    else head -n "$SHIP_CHECK_LINES" "$WORK/raw/test.$lang" > "$check/raw/test.$lang"; fi
  done
  run_logged "$WORK/logs/ship.log" fairseq-kd spm --input-dir "$check/raw" --src "$SRC" --tgt "$TGT" \
    --splits test --model "$dir/spm.model" --out "$check/pieces"
  run_logged "$WORK/logs/ship.log" fairseq-preprocess -s "$SRC" -t "$TGT" --testpref "$check/pieces/test.sp" \
    --destdir "$check/bin" --srcdict "$dir/dict.txt" --joined-dictionary --workers 1
  [ -n "$DRY_RUN" ] || rm -f "$dir/evaluation.check.json"
  CUDA_VISIBLE_DEVICES=${FIRST_GPU/#cpu/} run_logged "$WORK/logs/ship.log" fairseq-kd evaluate \
    --data "$check/bin" --checkpoint "$dir/$file" --name "$name" --ref "$check/raw/test.$TGT" \
    --results "$dir/evaluation.check.json" --beam "$BEAM" --batch-size "$EVAL_BATCH_SIZE" \
    --max-len-a "$MAX_LEN_A" --max-len-b "$MAX_LEN_B" "${DEVICE_ARGS[@]}" --no-user-dir
}

# ship_results DIR: DIR's results files name the model by its file name (no path of this
# machine), and the hypotheses fairseq-kd evaluate wrote beside them are not shipped.
# (ship_students does the same in student_provenance.)
ship_results() {
  rm -f "$1"/evaluation*.txt
  python3 -c 'import sys; from fairseq_kd.shipping import portable_results
for path in sys.argv[1:]: portable_results(path)' "$1/evaluation.json" "$1/evaluation.check.json"
}

# ship_students: each student of SHIP_STUDENTS as a user gets it (examples/students/NAME in
# this repository), in SHIP_STUDENTS_DIR/NAME: student.pt (its $STUDENT_CHECKPOINT checkpoint,
# the one the export and evaluate steps use, exported as ship_model does), spm.model and
# dict.txt, evaluation.json and evaluation.check.json (as the teacher's) and README.md (how it
# was trained: student_provenance).  Only a student whose training has finished (its stamp);
# each folder is written whole beside its place (NAME.partial), checked, then moved into place
# and stamped ship_student_NAME, so a rerun skips it (delete the stamp to ship it again).
step_ship_students() {
  local root=${SHIP_STUDENTS_DIR:-$WORK/shipped_students} name students
  students=" $(echo $(student_names)) "
  [ -n "${SHIP_STUDENTS// /}" ] || die "ship_students: SHIP_STUDENTS names no student"
  for name in $SHIP_STUDENTS; do
    [[ "$students" == *" $name "* ]] || die "ship_students: $name is not a student of this study ($(echo $students)); set SHIP_STUDENTS"
  done
  for name in $SHIP_STUDENTS; do ship_student "$root" "$name"; done
}

ship_student() {
  local root=$1 name=$2 dir=$1/$2.partial ckpt
  ckpt=$(student_checkpoint "$name")
  if is_done "ship_student_$name"; then skip "ship_student_$name"; return; fi
  if [ -z "$DRY_RUN" ]; then
    [ -e "$WORK/done/student_$name" ] || die "ship_students: $name has not finished training (no $WORK/done/student_$name); ship it once it has"
    use_checkpoint "$name"
    [ -s "$ckpt" ] || die "ship_students: $ckpt not found"
  fi
  log "ship student $name ($(basename "$ckpt")) -> $root/$name"
  run_cmd rm -rf "$dir"
  run_cmd mkdir -p "$dir"
  ship_model "$ckpt" "$dir" student.pt
  ship_evaluate "$dir" student.pt "$name"
  ship_check "$dir" student.pt "$name"
  if [ -z "$DRY_RUN" ]; then
    rm -f "$dir"/evaluation*.txt  # the hypotheses: not shipped
    student_provenance "$name" "$dir" || die "ship_students: $dir is not fit to ship (above)"
  fi
  run_cmd rm -rf "${root:?}/$name"
  run_cmd mv "$dir" "$root/$name"
  mark_done "ship_student_$name"
}

# method_corpus NAME: what student NAME trained on, in words (its README).
method_corpus() {
  local data; data=$(basename "$(method_data "$1")")
  case $1 in
    hybrid_kd | hybrid_fixed) echo "the gold pairs (\`$data/\`) and the teacher's beam-$BEAM translations (\`distilled/\`), mixed per sentence by its gate" ;;
    *) case $data in
         bin) echo "the gold pairs (\`bin/\`)" ;;
         distilled) echo "the teacher's beam-$BEAM translations of the training sources (\`distilled/\`, Seq-KD)" ;;
         *) echo "\`$data/\` (fairseq-kd corpus $(corpus_variant_args "$1"))" ;;
       esac ;;
  esac
}

# The students' vocabulary, in words (a shipped student's README).
vocabulary_setting() {
  if [ -n "$TEACHER_CT2" ]; then echo "trained by the recipe on the source and TEACHER_CT2's translations ($VOCAB pieces)"
  elif [ -n "$TEACHER_PATH" ]; then echo "the teacher's (TEACHER_SPM, TEACHER_DICT)"
  else echo "trained by the recipe on the training pairs ($VOCAB pieces), the teacher's too"; fi
}

# The machine, in words: its CPU and cores (not OMP_NUM_THREADS, which nproc would report).
machine_setting() {
  echo "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | xargs), $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) cores"
}

# student_provenance NAME DIR: DIR, where the student NAME is being shipped, finished and
# checked (fairseq_kd.shipping.finish_student_folder): its results files name student.pt,
# its README.md says how it was trained, and nothing in it names a path of this machine
# (the work folder, the repository, the home folder); the README is printed.
student_provenance() {
  local name=$1 dir=$2 method=$1 ckpt teacher= corpus
  ckpt=$(student_checkpoint "$name")
  if [[ $name == pruned* ]]; then
    method=$PRUNE_FROM
    corpus="$(method_corpus "$method"), pruned to $(pruned_ratio "$name") (fairseq-kd prune) and retrained with the mask held"
    pruned_train_args "$name"
  else
    corpus=$(method_corpus "$method")
    student_train_args "$name"
  fi
  [ "$method" = baseline ] || teacher=$(teacher_setting)
  SHIP="$dir" CKPT="$ckpt" LOG="$WORK/logs/student_$name.log" NAME="$name" RECIPE="$RECIPE" \
  PROFILE="$PROFILE" PAIR="$SRC -> $TGT" COMMIT="$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)" \
  CORPUS="$corpus" \
  TEACHER="$teacher" VOCABULARY="$(vocabulary_setting)" MODEL_ARGS="$STUDENT_ARGS" CHOICE="$(checkpoint_kind)" \
  STALE="$(epochs_since_best "$WORK/student_$name")" \
  PATIENCE="$(option_value --patience "${TRAIN_ARGS[@]}")" \
  CPU="$(machine_setting)" JOBS="$STUDENT_JOBS" TRAIN_PAIRS="$(wc -l < "$WORK/raw/train.$SRC")" VOCAB="$(wc -l < "$dir/dict.txt")" \
  TEST="$(basename "$WORK")/raw/test.$TGT" TEST_LINES="$(wc -l < "$WORK/raw/test.$TGT")" \
  ROOTS="$WORK:$REPO" FORBIDDEN="$WORK:$REPO:$HOME" python3 - "${TRAIN_ARGS[@]}" <<'PY'
import os, sys
from fairseq_kd.errors import KDError
from fairseq_kd.shipping import StudentShipment, finish_student_folder
e = os.environ
shipment = StudentShipment(
    name=e["NAME"], recipe=e["RECIPE"], profile=e["PROFILE"], pair=e["PAIR"], commit=e["COMMIT"],
    train_command=sys.argv[1:], corpus=e["CORPUS"], teacher=e["TEACHER"], model_args=e["MODEL_ARGS"],
    checkpoint_choice=e["CHOICE"], stale=e["STALE"], patience=e["PATIENCE"], machine=e["CPU"], jobs=e["JOBS"],
    train_pairs=int(e["TRAIN_PAIRS"]), vocab=int(e["VOCAB"]), vocabulary=e["VOCABULARY"], test=e["TEST"], test_lines=int(e["TEST_LINES"]),
    roots=tuple(e["ROOTS"].split(":")))
try:
    print(finish_student_folder(e["SHIP"], "student.pt", e["CKPT"], e["LOG"], shipment,
                                e["FORBIDDEN"].split(":")), end="")
except KDError as error:
    sys.exit(str(error))
PY
}

# The shipped teacher's README: what a user needs to trust and reproduce it.
teacher_provenance() {
  SHIP="$1" CKPT="$WORK/teacher/checkpoint_best.pt" RECIPE="$RECIPE" PROFILE="$PROFILE" \
  PAIR="$SRC -> $TGT" COMMIT="$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)" \
  STALE="$(epochs_since_best "$WORK/teacher")" PATIENCE="$(option_value --patience $TEACHER_TRAIN)" \
  CPU="$(machine_setting)" \
  TEACHER_ARGS="$TEACHER_ARGS" TEACHER_TRAIN="$TEACHER_TRAIN" VOCAB="$VOCAB" \
  OPTIM="$OPTIM_ARGS --max-tokens $MAX_TOKENS --label-smoothing $LABEL_SMOOTHING" \
  TRAIN_PAIRS="$(wc -l < "$WORK/raw/train.$SRC")" TEST="$(basename "$WORK")/raw/test.$TGT" \
  TEST_LINES="$(wc -l < "$WORK/raw/test.$TGT")" TRAIN_LOG="$WORK/logs/teacher.log" python3 - <<'PY'
import datetime, json, os, re
import torch
e = os.environ


def valid_losses_and_stop(log, stale, patience):
    """Valid loss by epoch (the last run of each epoch when a run resumed) and why training stopped."""
    losses, stop = {}, "max-epoch reached"
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.search(r"epoch (\d+) \| valid on 'valid' subset \| loss ([\d.]+)", line)
            if m:
                losses[int(m.group(1))] = float(m.group(2))
            elif "Stopping training due to" in line:
                stop = "the clock: " + line.split("Stopping training due to ", 1)[1].strip()
    if patience and stale and int(stale) >= int(patience):
        stop = f"early stopping: no better valid loss in the {stale} epochs after the best (--patience {patience})"
    return [losses[k] for k in sorted(losses)], stop


curve, stop = valid_losses_and_stop(e["TRAIN_LOG"], e["STALE"], e["PATIENCE"])
check = json.load(open(os.path.join(e["SHIP"], "evaluation.check.json")))["systems"][0]
state = torch.load(e["CKPT"], map_location="cpu", weights_only=False)
extra = state["extra_state"]
ev = json.load(open(os.path.join(e["SHIP"], "evaluation.json")))
t = ev["systems"][0]
g, b = t["greedy"], t["beam"]
print(f"""# Teacher: {e['RECIPE']}, PROFILE={e['PROFILE']} ({e['PAIR']})

Made by `PROFILE={e['PROFILE']} recipes/{e['RECIPE']}/run.sh teacher` with the settings below;
shipped on {datetime.date.today()} by `run.sh ship` at git {e['COMMIT']}.

| | |
|---|---|
| model | `{e['TEACHER_ARGS']}`, {t['params'] / 1e6:.1f}M parameters, stored as float16 (`fairseq-kd export --half --portable`) |
| training | `{e['TEACHER_TRAIN']}`, `{e['OPTIM']}` |
| data | {e['TRAIN_PAIRS']} training pairs, joint SentencePiece vocabulary {e['VOCAB']} (`spm.model`, `dict.txt`) |
| best checkpoint | epoch {extra['train_iterator']['epoch'] - 1}, {state['optimizer_history'][-1]['num_updates']} updates, {extra['previous_training_time'] / 3600:.2f} h of training to it (fairseq's cumulative wall time, including any time the machine was shared) |
| machine | {e['CPU']} |
| best valid loss | {extra['best']:.3f} (label-smoothed cross-entropy, bits per token) |
| valid loss by epoch | {', '.join(f'{v:.3f}' for v in curve)} |
| stopped by | {stop} |
| test, greedy | sacreBLEU {g['bleu']}, chrF {g['chrf']}, {g['sentences_per_s']} sentences/s |
| test, beam {b['beam']} | sacreBLEU {b['bleu']}, chrF {b['chrf']}, {b['sentences_per_s']} sentences/s |

Test: `{e['TEST']}`, {e['TEST_LINES']} sentences, scored from this folder's `teacher.pt` by
stock fairseq (no plugin) on {ev['device']}: `evaluation.json`.
BLEU signature `{ev['bleu_signature']}`.
`evaluation.check.json`: the first {check['sentences']} test pairs scored the same way from this
folder alone (greedy BLEU {check['greedy']['bleu']}, beam BLEU {check['beam']['bleu']}), which
`tests/test_shipped_teacher.py` reproduces from a clean clone.""")
PY
}

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
