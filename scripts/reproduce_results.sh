#!/usr/bin/env bash
# Regenerates the README's Results: pretraining of MoCo v1, v2 and v3 on Fashion-MNIST with the tuned
# experiments (conf/experiment/, with conf/recipe/fashion_mnist.yaml), then kNN and the linear probe (six optimizers) for
# them and for the raw-pixel and random-init baselines, then the table and the figures.
#
#   scripts/reproduce_results.sh                      # hours on a CPU (docs/results.md)
#   LONG_MINUTES=150 scripts/reproduce_results.sh     # also a MoCo v2 run of this many minutes
#   OUT=runs/results2 scripts/reproduce_results.sh    # elsewhere (default runs/results)
#   METHODS=moco_v2 scripts/reproduce_results.sh      # pretrain only these (default v2, v1, v3)
#   SUPERVISED=0 scripts/reproduce_results.sh         # no supervised reference (default: one,
#                                                     # in the recipe's hour, as the MoCo runs)
#
# Re-running continues: finished steps are skipped and an interrupted pretraining resumes from
# its last checkpoint. The table's time is the run's own training clock (time/train_s, all parts
# of a resumed run); wall_seconds, the command's wall time, covers the last part only and is the
# fallback for runs without that clock. Everything goes to $OUT; the figures are copied to
# docs/figures/, and each run's kNN curve is kept in docs/curves/ (the figure draws those kept
# from earlier runs too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/results}
for old in LONG_EPOCHS SUPERVISED_EPOCHS; do  # runs are set by time now, not by epochs
    if [[ -n ${!old:-} ]]; then echo "error: $old is gone: use LONG_MINUTES or SUPERVISED=0" >&2; exit 2; fi
done
mkdir -p "$OUT"

pretrain() {  # name, overrides...
    local name=$1 dir="$OUT/$1"
    shift
    if [[ -f $dir/wall_seconds ]]; then echo "== $name: done"; return; fi
    echo "== pretraining $name"
    echo "python scripts/pretrain.py $*" > "$OUT/$name.command"
    local start=$SECONDS
    "$PY" scripts/pretrain.py "$@" hydra.run.dir="$dir"
    mv "$OUT/$name.command" "$dir/command"
    echo $((SECONDS - start)) > "$dir/wall_seconds"
}

evaluate() {  # name, checkpoint, overrides...
    local name=$1 checkpoint=$2
    shift 2
    if [[ ! -f $OUT/knn_$name/knn.json ]]; then
        "$PY" scripts/knn_eval.py checkpoint="$checkpoint" "$@" hydra.run.dir="$OUT/knn_$name"
    fi
    # The table's command for rows without pretraining (the baselines).
    echo "python scripts/knn_eval.py checkpoint=$checkpoint $*" > "$OUT/knn_$name/command"
    if [[ ! -f $OUT/compare_$name/compare.json ]]; then
        "$PY" scripts/compare_optimizers.py checkpoint="$checkpoint" "$@" \
            hydra.run.dir="$OUT/compare_$name"
    fi
}

main() {  # in a function, so bash parses the whole script before running it: an edit of
           # this file during a long run then cannot change what the running copy does
    for method in ${METHODS:-moco_v2 moco_v1 moco_v3_fashion_mnist}; do
        pretrain "$method" +experiment="$method"
    done
    if [[ -n ${LONG_MINUTES:-} ]]; then  # the budget plans the epochs; 200 is only a bound
        pretrain moco_v2_long +experiment=moco_v2 time_budget_minutes="$LONG_MINUTES" \
            trainer.max_epochs=200
    fi
    # The bar for the self-supervised rows: the same backbone and data trained with the labels,
    # for the same time (the recipe's budget).
    if [[ ${SUPERVISED:-1} != 0 ]]; then
        pretrain supervised +experiment=supervised
    fi

    evaluate raw raw
    evaluate random random random_from=moco_v2  # the encoder MoCo v2 pretrains, untrained
    for name in moco_v2 moco_v1 moco_v3_fashion_mnist moco_v2_long supervised; do
        if [[ -f $OUT/$name/checkpoints/last.ckpt ]]; then
            evaluate "$name" "$OUT/$name/checkpoints/last.ckpt"
        fi
    done

    # The nearest-neighbour picture of the default experiment (cached features: seconds).
    "$PY" scripts/knn_eval.py checkpoint="$OUT/moco_v2/checkpoints/last.ckpt" \
        knn.picture.queries=10 hydra.run.dir="$OUT/neighbours_moco_v2"

    "$PY" scripts/results_table.py "$OUT" --figure docs/figures/knn_per_epoch.png \
        --curves docs/curves
    cp "$OUT/compare_moco_v2/loss_curves.png" docs/figures/probe_optimizers_moco_v2.png
    cp "$OUT/neighbours_moco_v2/neighbours.png" docs/figures/neighbours_moco_v2.png
    echo "Figures in docs/figures/; table in $OUT/results.md"
}

main "$@"; exit $?  # on the same line: bash must not read on after main (the file may be edited meanwhile)
