#!/bin/bash
# Issue 14 item 3 (c): pre-training over every title once (ISS/LPS, one pair per document), then fine-tuning.
set -u
cd "$(git rev-parse --show-toplevel)"
R=runs/rr; G=$R/gen4; T=$R/gen3/trie; B=.venv/bin
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
[ -f $G/pt-cover/metrics.json ] || /usr/bin/time -f "%e s %M KB" -o $G/pt-cover.time $B/rag train retriever --kind generative --stage pretrain \
  --model gemma-3-270m --corpus $R/vital10k --pairs $G/pairs-cover.jsonl --peft lora --max-steps 1253 --batch-size 8 \
  --eval-every 0 --save-every 200 --seed 0 --out $G/pt-cover --overwrite > $G/pt-cover.train.json 2> $G/pt-cover.train.log || { echo "pretrain failed"; exit 1; }
echo "pretrain done in $(( $(date +%s) - t0 )) s"
ft() {  # name train seed
  local name=$1 train=$2 seed=$3 t1=$(date +%s)
  $B/rag train retriever --kind generative --stage finetune --init $G/pt-cover --corpus $R/vital10k --train $train \
     --peft lora --max-steps 100 --batch-size 8 --eval-every 0 --save-every 0 --seed $seed --out $G/$name --overwrite \
     > $G/$name.train.json 2> $G/$name.train.log || { echo "$name failed"; return; }
  $B/rag retrieve --index $T --model $G/$name --queries $R/fanoutqa/dev.jsonl --beams 5 --k 10 --out $G/$name-dev.jsonl \
     --overwrite 2> $G/$name.retrieve.log || { echo "$name retrieve failed"; return; }
  echo "$name done in $(( $(date +%s) - t1 )) s"
}
ft pt-ft-10pct-s0 $R/gen3/train-10pct.jsonl 0
ft pt-ft-s0 $R/fanoutqa/train.jsonl 0
echo ALL DONE
