#!/usr/bin/env bash
# Multi-GPU run (issue: multi-GPU): train, statistics, shard-local compression and
# evaluation of a DLRM-DCNv2 over NCCL on N GPUs of one host, checked against a
# one-process compression of the same checkpoint, and reloaded at other world sizes.
# Ends with each stage's samples/s per GPU and in total, its scaling from 1 GPU to N and
# the peak memory of every GPU (the `throughput` records the stages write).
#
# usage: N=2 CAP=1000000 ROWS=400000 OUT=/tmp/mg bash bench/multigpu.sh
# needs: afmrec, torchrec and fbgemm-gpu importable by python3 (PYTHONPATH).
set -euo pipefail
N=${N:-2}; CAP=${CAP:-1000000}; ROWS=${ROWS:-400000}; OUT=${OUT:-/tmp/mg}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
A="python3 -m afmrec.launch.cli"
T() { local n=$1; shift; torchrun --standalone --nproc_per_node "$n" -m afmrec.launch.cli "$@"; }
clock() { local name=$1; shift; local t0=$(date +%s%N); "$@"; echo "TIME $name $(( ($(date +%s%N) - t0) / 1000000 )) ms"; }

# MLPerf DLRMv2 cardinalities capped at $CAP, its bag sizes as the largest bags.
ROWS_PER_TABLE=$(python3 -c "
from afmrec.pipeline.benchmarks.speed.shape import CRITEO_1TB_ROWS as R; print(','.join(str(min(r, $CAP)) for r in R))")
BAGS=$(python3 -c "from afmrec.pipeline.benchmarks.speed.shape import MLPERF_BAG_SIZES as B; print(','.join(map(str, B)))")
# big tables row-wise, two mid-size ones column-wise (2 shards of 64), the rest table-wise
SHARD=("*=table_wise" "C1=row_wise" "C10=row_wise" "C20=row_wise" "C21=row_wise" "C22=row_wise"
       "C11=column_wise" "C12=column_wise")
MODEL=(--arch dcn --embedding-dim 128 --over-arch 1024,1024,512,256,1 --dcn-low-rank-dim 512)

rm -rf "$OUT"; mkdir -p "$OUT"
clock synth $A synth --out "$OUT/data" --rows "$ROWS" --test-rows 50000 --tables "$ROWS_PER_TABLE" \
    --multi-hot "$BAGS" --quiet
clock train_${N}gpu T "$N" train --data "$OUT/data/train" "${MODEL[@]}" --epochs 2 --batch-size 8192 \
    --val-fraction 0.05 --device cuda --sharding "${SHARD[@]}" --out "$OUT/original" --quiet
clock train_1gpu T 1 train --data "$OUT/data/train" "${MODEL[@]}" --epochs 2 --batch-size 8192 \
    --val-fraction 0.05 --device cuda --out "$OUT/original_1gpu" --quiet
clock stats_${N}gpu T "$N" stats --model "$OUT/original" --data "$OUT/data/train" --device cuda \
    --sharding "${SHARD[@]}" --batch-size 8192 --out "$OUT/stats.pt" --quiet
clock stats_1gpu T 1 stats --model "$OUT/original" --data "$OUT/data/train" --device cuda \
    --batch-size 8192 --out "$OUT/stats_1gpu.pt" --quiet
clock compress_${N}gpu T "$N" compress --model "$OUT/original" --stats "$OUT/stats.pt" --ratio 4 \
    --device cuda --sharding "${SHARD[@]}" --out "$OUT/afm" --quiet
clock compress_1gpu T 1 compress --model "$OUT/original" --stats "$OUT/stats.pt" --ratio 4 \
    --device cuda --out "$OUT/afm_1gpu" --quiet
# the serving artifact of the N-GPU compression, int8 tables, written and checked on one GPU
clock export_1gpu $A export --model "$OUT/afm" --tables int8 --device cuda --out "$OUT/afm_int8.pt"
clock eval_${N}gpu T "$N" evaluate --data "$OUT/data/test" --device cuda --sharding "*=row_wise" \
    --batch-size 8192 --latency-batch 8192 original="$OUT/original" afm="$OUT/afm" afm_1gpu="$OUT/afm_1gpu" \
    --out "$OUT/report_${N}gpu.parquet" --quiet
clock eval_1gpu T 1 evaluate --data "$OUT/data/test" --device cuda --batch-size 8192 \
    --latency-batch 8192 original="$OUT/original" afm="$OUT/afm" --out "$OUT/report_1gpu.parquet" --quiet
clock eval_cpu $A evaluate --data "$OUT/data/test@0:0.1" --device cpu --batch-size 4096 \
    --latency-batch 1024 afm="$OUT/afm" --out "$OUT/report_cpu.parquet" --quiet
# logits of the N-GPU shard-local compression vs the one-process one, on one test batch
python3 - "$OUT" <<'PY'
import sys, torch
from pathlib import Path
from afmrec.pipeline.model_io import load_model
from afmrec.pipeline.stages import DataRef
out = Path(sys.argv[1])
batch = next(iter(DataRef(out / "data" / "test").batches(4096)))
logits = {}
for name in ("afm", "afm_1gpu"):
    model, _ = load_model(out / name, "cpu")
    model.eval()
    with torch.no_grad():
        logits[name] = model(batch.dense_features, batch.sparse_features)
    del model
print("MAXDIFF", (logits["afm"] - logits["afm_1gpu"]).abs().max().item())
PY
# Throughput and peak memory per stage, N GPUs against 1 (tests/test_runinfo.py runs this
# block on a CPU run of the same layout).
python3 - "$OUT" "$N" <<'PY'
import sys
from pathlib import Path
from afmrec.pipeline.model_io import load_record
from afmrec.pipeline.report import read_report
from afmrec.pipeline.runinfo import RunInfo, speedup
from afmrec.pipeline.stages import load_statistics
out, n = Path(sys.argv[1]), int(sys.argv[2])
for name in ("original", "original_1gpu"):
    h = load_record(out / name).provenance["history"]
    print("TRAIN", name, "rank 0 samples/s per history record", [round(r["samples_per_s"]) for r in h])

def model(name):
    return RunInfo.from_dict(load_record(out / name).provenance["throughput"])

def stats(name):
    return RunInfo.from_dict(load_statistics(out / name).meta["throughput"])

def report(name):
    return {r["variant"]: RunInfo.from_json(r["throughput"]) for r in read_report(out / name)}

pairs = {"train": (model("original"), model("original_1gpu")),
         "stats": (stats("stats.pt"), stats("stats_1gpu.pt")),
         "compress": (model("afm"), model("afm_1gpu"))}
many, one = report(f"report_{n}gpu.parquet"), report("report_1gpu.parquet")
pairs.update({f"evaluate {v}": (many[v], one[v]) for v in many if v in one})
for stage, (a, b) in pairs.items():
    print("STAGE", a.summary(f"{stage} {n}gpu"))
    print("STAGE", b.summary(f"{stage} 1gpu"))
    x = speedup(a, b)
    print("SCALING", f"{stage}: {n} vs 1 GPU", "-" if x is None else f"{x:.2f}x ({x / n:.0%} of linear)")
PY
