# Bible es-en study, sized for one GPU (H100): every variable can be set from
# the environment, e.g.  GPUS=1 STUDENT_JOBS=4 recipes/bible_es_en/run.sh
RECIPE=bible_es_en
RECIPE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RECIPE_DIR/../.." && pwd)
SRC=es TGT=en

# --- where and on what
WORK=${WORK:-$REPO/work/bible_es_en}          # everything the recipe writes, but the report
GPUS=${GPUS:-auto}                            # CUDA ids "0,1", "auto" (all) or "cpu"
FP16=${FP16:-1}                               # fp16 training and decoding on GPU
STUDENT_JOBS=${STUDENT_JOBS:-8}               # students trained at the same time (sharing the GPUs)
SEED=${SEED:-1}

# --- data: the Bible corpus (25,614 / 1,000 / 2,000 pairs); 0 = the whole split
BIBLE_DIR=${BIBLE_DIR:-}                      # folder {train,valid,test}.{es,en}; empty = examples/data archive
TRAIN_LINES=${TRAIN_LINES:-0} VALID_LINES=${VALID_LINES:-0} TEST_LINES=${TEST_LINES:-0}
VOCAB=${VOCAB:-8000}                          # joint SentencePiece vocabulary
PREPROCESS_WORKERS=${PREPROCESS_WORKERS:-8}

# --- training (fairseq-train options; strings are split on spaces)
OPTIM_ARGS=${OPTIM_ARGS:---optimizer adam --adam-betas (0.9,0.98) --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 1000 --clip-norm 1.0 --weight-decay 0.0001}
MAX_TOKENS=${MAX_TOKENS:-4096}
LABEL_SMOOTHING=${LABEL_SMOOTHING:-0.1}
# Budgets fit one H100 in about 25 minutes in all (teacher ~10, corpora ~3, students
# in parallel ~7, pruning ~3, evaluation ~2); each run stops at whichever limit comes first.
# Teacher: to convergence (early stopping on valid loss), as an undertrained
# teacher makes KD look useless; stock fairseq reached sacreBLEU ~42-44 (beam 5)
# with this model after 5-8 minutes on one H100.
TEACHER_ARGS=${TEACHER_ARGS:---arch transformer_iwslt_de_en --share-all-embeddings --dropout 0.3}
TEACHER_TRAIN=${TEACHER_TRAIN:---max-epoch 60 --patience 8 --stop-time-hours 0.16}
# students: 3+3 layers, 256-dim (7.6M parameters with an 8k vocabulary)
STUDENT_ARGS=${STUDENT_ARGS:---arch transformer_student_small --share-all-embeddings --dropout 0.1}
STUDENT_TRAIN=${STUDENT_TRAIN:---max-epoch 40 --patience 5 --stop-time-hours 0.12}
METHODS=${METHODS:-baseline word_kd seq_kd seq_inter hybrid_kd ckd a2d}

# --- distilled corpora, pruning, evaluation
BEAM=${BEAM:-5}                               # Seq-KD corpus and the beam evaluation
SEQ_INTER_N=${SEQ_INTER_N:-35}                # Seq-Inter n-best size (Kim & Rush: 35)
CORPUS_MAX_TOKENS=${CORPUS_MAX_TOKENS:-12000}
MAX_LEN_A=${MAX_LEN_A:-1.5} MAX_LEN_B=${MAX_LEN_B:-10}
PRUNE_FROM=${PRUNE_FROM-seq_kd}               # student pruned and retrained ("" = no pruning)
PRUNE_RATIO=${PRUNE_RATIO:-0.5}
PRUNE_TRAIN=${PRUNE_TRAIN:---max-epoch 15 --patience 5 --stop-time-hours 0.05}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-128}

# --- report: committed with the repository
RESULTS_MD=${RESULTS_MD:-$REPO/docs/results.md}
PLOT_DIR=${PLOT_DIR:-$REPO/docs}
