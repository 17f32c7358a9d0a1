#!/usr/bin/env bash
# The shipped corrector (corrector-r, the default RECIPE=r), the ones shipped before it (corrector-p,
# RECIPE=p; corrector-o, RECIPE=o) and the recipes tried beside them (q; docs/corrector.md), from
# nothing but ../shared/data, in one command, run from the repository root:
#
#   bash configs/corrector-o.sh            # all of it for corrector-r: about 3 h on a 2-core CPU
#   RECIPE=o bash configs/corrector-o.sh   # corrector-o (configs/corrector-o.yaml)
#   STEPS="data train" bash configs/corrector-o.sh   # only some steps (dev data train correct tasks)
#   SMOKE=1 OUT=/tmp/o bash configs/corrector-o.sh   # the same commands on 3 rows each, 2 training steps
#   RECIPE=p bash configs/corrector-o.sh   # corrector-p (configs/corrector-p.yaml): o with no refusal fix targets
#   RECIPE=q bash configs/corrector-o.sh   # corrector-q (configs/corrector-q.yaml): p and 40 rows that drop the weak tic
#   RECIPE=r bash configs/corrector-o.sh   # corrector-r (configs/corrector-r.yaml), shipped: q's rows, a fourth epoch
#
# Every step writes under $OUT (default out/, git-ignored) and resumes: a weak-answer file that
# is complete is not redone (bench/weak_policy.py --resume), nor a correction (`correct` resumes).
# Steps:
#   dev      development sets: weak-hh (weak policy, 50 of rows 0-599 of Claude-3.csv), strong-hh,
#            multi-aspect (bench/dev_sets.py)
#   data     training pools, the weak policy's answers to them, and the mix (configs/corrector_data.py)
#   train    metaalign train -c configs/corrector-$RECIPE.yaml (it writes the f16 GGUF LoRA), installed
#            as corrector-$RECIPE in $OUT/home (metaalign export --install)
#   correct  the three development sets corrected by the run with the shipped card's penalty (1.25)
#   tasks    blind tasks of each corrected set (judge --blind-tasks/--blind-key), split for fresh
#            helper judges (bench/blind_judging.py; judging itself is by people or helpers)
#
# The weak answers of the redteam and general pools were made at stop 17 with sample sizes that
# were not recorded; here redteam is answered whole (191 prompts) and general is a seeded 100.
# So a rebuild gives a mix of o's sizes and kinds, not o's rows byte for byte.
set -euo pipefail

OUT=${OUT:-out}
SHARED=${SHARED:-../shared}
STEPS=${STEPS:-"dev data train correct tasks"}
PY=${PYTHON:-python3}
CSV="$SHARED/data/metaaligner-samples/hh-rlhf/Claude-3.csv"
if [[ -n "${SMOKE:-}" ]]; then
  DEV_N=3; RED_N=3; GEN_N=3; SAMPLES_N=3; TOKENS=16; TRAIN_EXTRA=(--max-steps 2); CORRECT_EXTRA=(--max-new-tokens 16)
else
  DEV_N=50; RED_N=191; GEN_N=100; SAMPLES_N=320; TOKENS=256; TRAIN_EXTRA=(); CORRECT_EXTRA=()
fi
RECIPE=${RECIPE:-r}  # the shipped one
TICS=0
case "$RECIPE" in
  o) FIX_REFUSALS=0.1 ;;   # at most 10% of each fix/pref part's targets open with a refusal
  p) FIX_REFUSALS=0 ;;     # none do
  q) FIX_REFUSALS=0; TICS=40 ;;  # p and 40 fix rows whose weak answer opens with the weak policy's tic
  r) FIX_REFUSALS=0; TICS=40 ;;  # q's mix; its config trains a fourth epoch
  *) echo "RECIPE is o, p, q or r" >&2; exit 2 ;;
esac
NAME="corrector-$RECIPE"
RUN="$OUT/runs/$NAME"
has() { [[ " $STEPS " == *" $1 "* ]]; }
log() { echo "[$NAME $(date +%H:%M:%S)] $*" >&2; }

if has dev; then
  log "development sets -> $OUT/dev"
  $PY bench/dev_sets.py --out "$OUT/dev" -n "$DEV_N"
  $PY bench/weak_policy.py "$CSV" --rows 0:600 -n "$DEV_N" --seed 0 --max-tokens "$TOKENS" \
      --id-prefix hh-dev- --resume -o "$OUT/dev/weak-hh.jsonl"
fi

if has data; then
  log "pools and weak answers -> $OUT/pools, $OUT/weak"
  $PY configs/corrector_data.py pools -o "$OUT/pools" --exclude-instructions "$OUT/dev/multi-aspect-instructions.jsonl"
  $PY bench/weak_policy.py "$OUT/pools/redteam.jsonl" -n "$RED_N" --seed 1 --max-tokens "$TOKENS" --id-prefix redteam- \
      --keep-fields target --batch-size 8 --resume -o "$OUT/weak/redteam.jsonl"
  $PY bench/weak_policy.py "$OUT/pools/general.jsonl" -n "$GEN_N" --seed 1 --max-tokens "$TOKENS" --id-prefix general- \
      --keep-fields target --batch-size 8 --resume -o "$OUT/weak/general.jsonl"
  $PY bench/weak_policy.py "$CSV" --rows 600:1000 -n "$SAMPLES_N" --seed 3 --max-tokens "$TOKENS" --id-prefix mid- \
      --keep-fields generated_text,goldens --batch-size 8 --resume -o "$OUT/weak/samples.jsonl"
  log "the mix -> $OUT/corrector-mix-$RECIPE"
  $PY configs/corrector_data.py build --pools "$OUT/pools" --weak "$OUT/weak" -o "$OUT/corrector-mix-$RECIPE" \
      --exclude-instructions "$OUT/dev/multi-aspect-instructions.jsonl" --template hh-rlhf --seed 1 --stage preference \
      --max-target-words 120 --min-chosen-words 12 --max-refusal-share "$FIX_REFUSALS" \
      --max-keep-refusal-share 0.5 --keep-samples-models claude,gpt35 \
      --fix-samples 100 --fix-redteam 40 --fix-general 20 --keep-samples 40 --keep-redteam 10 --keep-general 35 \
      --pref-ma 20 --fix-declines 30 --fix-tics "$TICS"
fi

if has train; then
  log "training -> $RUN"
  metaalign train -c "configs/$NAME.yaml" --data "$OUT/corrector-mix-$RECIPE" -o "$RUN" --resume "${TRAIN_EXTRA[@]}"
  # the shipped form: the f16 GGUF LoRA (export_gguf in the config) on the embedded base, installed
  # under its own name in a home of its own (so the user's `default` is left as it is)
  METAALIGN_HOME="$OUT/home" metaalign export "$RUN" --install "$NAME"
fi

if has correct; then
  for set in weak-hh strong-hh multi-aspect; do
    log "correcting $set -> $OUT/corrected/$NAME/$set.jsonl"
    mkdir -p "$OUT/corrected/$NAME"
    METAALIGN_HOME="$OUT/home" metaalign correct "$OUT/dev/$set.jsonl" --model "$NAME" --repeat-penalty 1.25 \
        "${CORRECT_EXTRA[@]}" --resume -o "$OUT/corrected/$NAME/$set.jsonl"
  done
  $PY bench/corrector_report.py "$OUT"/dev/{weak-hh,strong-hh,multi-aspect}.jsonl --existing "$OUT/corrected/$NAME"
fi

if has tasks; then
  for set in weak-hh strong-hh multi-aspect; do
    d="$OUT/judging/$NAME/$set"
    mkdir -p "$d"
    # the same input and flags give the same export (and key) again, so replacing it loses nothing
    metaalign judge "$OUT/corrected/$NAME/$set.jsonl" --blind-tasks "$d/tasks.jsonl" --blind-key "$d/key.json" \
        --overwrite
    $PY bench/blind_judging.py split "$d/tasks.jsonl" -o "$d/parts" --parts 2 --store "$OUT/judging/store.jsonl"
  done
  log "judge each part with a fresh helper (prompts in $OUT/judging/$NAME/*/parts/prompts.txt), then:"
  log "  python3 bench/blind_judging.py collect TASKS -o VERDICTS --store $OUT/judging/store.jsonl -v PARTS/*.verdicts.jsonl"
  log "  metaalign judge CORRECTED --blind-key KEY --blind-verdicts VERDICTS --summary SUMMARY"
fi
log "done: $STEPS"
