# WMT14 English-German: transformer-big teacher on several GPUs.  Every
# variable can be set from the environment, e.g.  GPUS=0,1,2,3 recipes/wmt14_en_de/run.sh
RECIPE=wmt14_en_de
RECIPE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RECIPE_DIR/../.." && pwd)

# --- data: "wmt14" downloads Europarl v7 + Common Crawl + News Commentary v9,
# newstest2013 (valid) and newstest2014 (test); "bible" uses a slice of the
# Bible es-en corpus shipped in the repository instead (no download: tests)
DATA_SOURCE=${DATA_SOURCE:-wmt14}
if [ "$DATA_SOURCE" = bible ]; then SRC=es TGT=en; else SRC=en TGT=de; fi
TRAIN_LINES=${TRAIN_LINES:-0} VALID_LINES=${VALID_LINES:-0} TEST_LINES=${TEST_LINES:-0}  # bible only; 0 = all
BIBLE_DIR=${BIBLE_DIR:-}
DOWNLOAD_DIR=${DOWNLOAD_DIR:-${WORK:-$REPO/work/wmt14_en_de}/download}
MAX_PAIR_LEN=${MAX_PAIR_LEN:-250}             # drop training pairs with a side longer (words) ...
MAX_PAIR_RATIO=${MAX_PAIR_RATIO:-2.5}         # ... or a word-length ratio above this
VOCAB=${VOCAB:-32000}                         # joint SentencePiece vocabulary
PREPROCESS_WORKERS=${PREPROCESS_WORKERS:-16}

# --- where and on what
WORK=${WORK:-$REPO/work/wmt14_en_de}
GPUS=${GPUS:-auto}                            # CUDA ids "0,1,2,3", "auto" (all) or "cpu"
FP16=${FP16:-1}
STUDENT_JOBS=${STUDENT_JOBS:-1}               # 1: each student trains on all GPUs, one after another
SEED=${SEED:-1}

# --- training (fairseq-train options; strings are split on spaces).  Batch per
# update = MAX_TOKENS x GPUs x --update-freq: 4096 x 8 x 8 = 262k tokens on 8 GPUs.
OPTIM_ARGS=${OPTIM_ARGS:---optimizer adam --adam-betas (0.9,0.98) --lr 7e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --clip-norm 0.0 --weight-decay 0.0 --update-freq 8}
MAX_TOKENS=${MAX_TOKENS:-4096}
LABEL_SMOOTHING=${LABEL_SMOOTHING:-0.1}
TEACHER_ARGS=${TEACHER_ARGS:---arch transformer_vaswani_wmt_en_de_big --share-all-embeddings --dropout 0.3}
TEACHER_TRAIN=${TEACHER_TRAIN:---max-update 60000 --patience 10 --save-interval-updates 2000 --keep-interval-updates 1}
STUDENT_ARGS=${STUDENT_ARGS:---arch transformer_student_wmt_base --share-all-embeddings --dropout 0.1}
STUDENT_TRAIN=${STUDENT_TRAIN:---max-update 60000 --patience 10 --save-interval-updates 2000 --keep-interval-updates 1}
METHODS=${METHODS:-baseline word_kd seq_kd seq_inter hybrid_kd ckd a2d}

# --- distilled corpora (4.5M sentences: sharded over all GPUs), pruning, evaluation
BEAM=${BEAM:-5}
SEQ_INTER_N=${SEQ_INTER_N:-12}                # Kim & Rush used 35; cost grows with N
CORPUS_MAX_TOKENS=${CORPUS_MAX_TOKENS:-12000}
MAX_LEN_A=${MAX_LEN_A:-1.2} MAX_LEN_B=${MAX_LEN_B:-10}
PRUNE_FROM=${PRUNE_FROM-seq_kd}
PRUNE_RATIO=${PRUNE_RATIO:-0.5}
PRUNE_TRAIN=${PRUNE_TRAIN:---max-update 20000 --patience 5 --save-interval-updates 2000 --keep-interval-updates 1}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-128}

# --- everything else: the pipeline's defaults (report in $WORK/results.md)
source "$REPO/recipes/common/settings.sh"
