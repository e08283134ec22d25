# The ship and ship_students steps of the shared pipeline (sourced by pipeline.sh): the
# teacher and students as a user gets them, scored, with their provenance notes.

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

# ship_score FILE NAME DATA REF RESULTS: FILE scored by stock fairseq on DATA's test split
# against REF, as the system NAME, into RESULTS (written anew).
ship_score() {
  local file=$1 name=$2 data=$3 ref=$4 results=$5
  [ -n "$DRY_RUN" ] || rm -f "$results"
  CUDA_VISIBLE_DEVICES=${FIRST_GPU/#cpu/} run_logged "$WORK/logs/ship.log" fairseq-kd evaluate \
    --data "$data" --checkpoint "$file" --name "$name" --ref "$ref" \
    --results "$results" --beam "$BEAM" --batch-size "$EVAL_BATCH_SIZE" \
    --max-len-a "$MAX_LEN_A" --max-len-b "$MAX_LEN_B" "${DEVICE_ARGS[@]}" --no-user-dir
}

# ship_evaluate DIR FILE NAME: DIR/FILE scored on the test split by stock fairseq, as the
# system NAME, into DIR/evaluation.json.
ship_evaluate() {
  ship_score "$1/$2" "$3" "$WORK/bin" "$WORK/raw/test.$TGT" "$1/evaluation.json"
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
  ship_score "$dir/$file" "$name" "$check/bin" "$check/raw/test.$TGT" "$dir/evaluation.check.json"
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

# pruned_corpus NAME: how the pruned student NAME was made, in words (its README): the trained
# student it was pruned from, the prune command and the retraining.
pruned_corpus() {
  local name=$1 ratio from
  ratio=$(pruned_ratio "$name") from=$(student_checkpoint "$PRUNE_FROM")
  echo "$(method_corpus "$PRUNE_FROM") from \`$PRUNE_FROM\`'s trained student, $(awk -v r="$ratio" 'BEGIN { printf "%g", r * 100 }')% of its linear weights set to zero (\`fairseq-kd prune --path $from --ratio $ratio --out $(pruned_file "$name")\`), then retrained with the mask held"
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
  local name=$1 dir=$2 method=$1 ckpt teacher= corpus step=students
  ckpt=$(student_checkpoint "$name")
  if [[ $name == pruned* ]]; then
    method=$PRUNE_FROM step=prune
    corpus=$(pruned_corpus "$name")
    # the first run's command: it starts from the pruned weights (a resumed run from its own)
    # shellcheck disable=SC2046
    pruned_train_args "$name" $(pruned_start_args "$name")
  else
    corpus=$(method_corpus "$method")
    student_train_args "$name"
  fi
  [ "$method" = baseline ] || teacher=$(teacher_setting)
  SHIP="$dir" CKPT="$ckpt" LOG="$WORK/logs/student_$name.log" NAME="$name" RECIPE="$RECIPE" STEP="$step" \
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
    name=e["NAME"], recipe=e["RECIPE"], step=e["STEP"], profile=e["PROFILE"], pair=e["PAIR"], commit=e["COMMIT"],
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
