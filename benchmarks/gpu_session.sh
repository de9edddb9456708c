# Everything issues #3 and #5 measure on a GPU machine, as it was run on a lent H200
# (BENCHMARKS.md); this script itself, with the variants rewritten for the new
# `default` (its seed spread, with each patch standardised, and the larger histo_net
# with SAM), has not been run there yet. The machine has python3 with torch, timm, h5py, tifffile, pytest;
# not this project's other packages, hence PYTHONPATH=src.
#
#   OUT=results PCAM=/path/to/pcam-jpeg bash benchmarks/gpu_session.sh train
#       the GPU tests, then benchmarks/gpu.py: throughput, and the presets and
#       variants trained 8 at a time (each capped at CAP minutes); about 6.5 minutes.
#   OUT=results PCAM=/path/to/pcam-jpeg RUN=a-cpu-run bash benchmarks/gpu_session.sh slide
#       benchmarks/slide_speed.py on a 20,000 px slide built there; about 1.5 minutes.
#       Needs tiffslide, zarr, numcodecs and imagecodecs (carried there as wheels,
#       with tifffile: an older tifffile cannot serve zarr 3).
#   OUT and PCAM may be relative (to the repository root, where this runs). Each step
#   runs even if one before it failed; the script exits 1 if any did.
set -u -o pipefail
mode=${1:?train or slide}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1
# Absolute: the link below and the tar in /tmp/hd-gpu resolve them from other folders.
: "${OUT:?OUT=folder for the results}" "${PCAM:?PCAM=the pcam-jpeg folder}"  # here: inside $(...) it would not stop
OUT=$(realpath -m "$OUT")
PCAM=$(realpath -e "$PCAM") || { echo "gpu_session.sh: no such PCAM folder: $PCAM" >&2; exit 2; }
mkdir -p "$OUT"
failed=0
fail() { echo "gpu_session.sh: $1 failed; going on" >&2; failed=1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, timm; print(sys.version.split()[0], torch.__version__, timm.__version__)"
case $mode in
train)
    # The tests find the shared data beside the repository: link it there if it is missing.
    [ -e ../shared/data/pcam-jpeg ] || { mkdir -p ../shared/data && ln -s "$PCAM" ../shared/data/pcam-jpeg; }
    # Only these test files: the others import packages that machine lacks (fastapi, ...),
    # and one failed import stops pytest before it runs anything.
    # -rs: a skip says why (a test that skips for want of the data measured nothing).
    timeout 120 python3 -m pytest tests/test_augment.py tests/test_train.py -q -rs -m gpu -p no:cacheprovider 2>&1 \
        | tail -12 || fail "the GPU tests"
    timeout "${LIMIT:-470}" python3 benchmarks/gpu.py --data "$PCAM" --work /tmp/hd-gpu --out "$OUT/gpu.json" \
        --jobs 8 --cap-minutes "${CAP:-3}" \
        --variant "seed1=default --seed 1" \
        --variant "seed2=default --seed 2" \
        --variant "std=default --model histo_tinynet_std" \
        --variant "netsam=default --model histo_net --sam-rho 0.05" \
        --variant "net96c=default --model histo_net96" \
        2>&1 | tee "$OUT/log.txt" || fail "benchmarks/gpu.py"
    (cd /tmp/hd-gpu && tar czf "$OUT/runs.tgz" ./*.log run-*/run.json run-*/metrics.csv run-*/eval-*/metrics.json) \
        || fail "packing the runs"
    ;;
slide)
    python3 benchmarks/slide_speed.py "${RUN:?a run folder}" --slide /tmp/slide20k.tif --patches "$PCAM" \
        --whole-workers 0 8 --workers 0 8 --rounds 1 --batch-size 1024 2>&1 | tee "$OUT/slide.txt" \
        || fail "benchmarks/slide_speed.py"
    ;;
*) echo "gpu_session.sh: mode must be train or slide, not $mode" >&2; exit 2 ;;
esac
exit $failed
