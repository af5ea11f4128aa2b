#!/bin/bash
# Issue 14 item 3 (f) and (e): Gemma-3-270M fine-tune only, PEFT methods and low resource; 2-core CPU.
set -u
cd "$(git rev-parse --show-toplevel)"
R=runs/rr; G=$R/gen3; B=.venv/bin
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f $R/bm25-dev.jsonl ] || $B/rag retrieve --index $R/bm25 --queries $R/fanoutqa/dev.jsonl --k 50 --out $R/bm25-dev.jsonl
[ -f $G/trie/manifest.json ] || $B/rag index build --kind trie --model gemma-3-270m --corpus $R/vital10k --out $G/trie
$B/python - <<'PY'
import json, random
rows = [l for l in open("runs/rr/fanoutqa/train.jsonl", encoding="utf-8") if l.strip()]
rng = random.Random(0)
order = list(range(len(rows))); rng.shuffle(order)
for pct in (10, 25):
    n = round(len(rows) * pct / 100)
    keep = sorted(order[:n])
    open(f"runs/rr/gen3/train-{pct}pct.jsonl", "w", encoding="utf-8").writelines(rows[i] for i in keep)
    print(pct, n)
PY
arm() {  # name peft seed train
  local name=$1 peft=$2 seed=$3 train=$4
  [ -f $G/$name-vs-bm25.json ] && return
  local t0=$(date +%s)
  /usr/bin/time -f "%e s %M KB" -o $G/$name.time $B/rag train retriever --kind generative --stage finetune --model gemma-3-270m \
     --corpus $R/vital10k --train $train --peft $peft --max-steps 100 --batch-size 8 --eval-every 0 --save-every 0 \
     --seed $seed --out $G/$name --overwrite > $G/$name.train.json 2> $G/$name.train.log || { echo "$name train failed"; return; }
  $B/rag retrieve --index $G/trie --model $G/$name --queries $R/fanoutqa/dev.jsonl --beams 5 --k 10 \
     --out $G/$name-dev.jsonl --overwrite 2> $G/$name.retrieve.log || { echo "$name retrieve failed"; return; }
  $B/rag eval compare $R/fanoutqa/dev.jsonl $R/bm25-dev.jsonl $G/$name-dev.jsonl --out $G/$name-vs-bm25.json > /dev/null
  echo "$name done in $(( $(date +%s) - t0 )) s"
}
arm ft-lora-s0 lora 0 $R/fanoutqa/train.jsonl
arm ft-iaa-s0 iaa 0 $R/fanoutqa/train.jsonl
arm ft-iaa-s1 iaa 1 $R/fanoutqa/train.jsonl
arm ft-full-s1 full 1 $R/fanoutqa/train.jsonl
arm ft-lora-10pct-s0 lora 0 $G/train-10pct.jsonl
arm ft-lora-25pct-s0 lora 0 $G/train-25pct.jsonl
arm ft-lora-10pct-s1 lora 1 $G/train-10pct.jsonl
arm ft-lora-25pct-s1 lora 1 $G/train-25pct.jsonl
echo ALL DONE
